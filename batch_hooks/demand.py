"""Demand: every job the batch system knows, read in ONE call per cycle, and pending jobs counted per VO.

Slurm: ``squeue -h -a -r -t all -o '%i|%T|%u|%U|%l'`` (id, state, user, uid, time limit; ``-r`` gives one line
per array task, so a pending array of 500 tasks counts 500).  HTCondor: one schedd query through htcondor2
(canned ClassAds in tests), in a child process.  Every read has a hard deadline (``pools.read_timeout_s``):
a hung squeue or a silent collector/schedd is cut off and the cycle fails naming it, deciding nothing.  The
same reading serves the pool targets (pending jobs) and leak reclaim (every
job, with its walltime): one call, not one per VM.

The output is untrusted text (user names, and a site's squeue wrapper could print anything): every field is
checked against a strict pattern and a bound.  A bad line is skipped and counted for demand (under-counting
is safe), but the reading is then not trusted for reclaim (a missing line must never look like a gone job).
The VO comes from trusted identity only (provisioner.identity: the uid's pool account group, or the VO the
schedd recorded from the proxy), never from a job's name, comment or account.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from batch_hooks.context import JOB_ID_RE
from batch_hooks.reclaim import BatchJob
from provisioner.config import Config
from provisioner.errors import DeadlineExceeded, DynvmError, TransientError, UnavailableError, ValidationError

SQUEUE_FORMAT = "%i|%T|%u|%U|%l"
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
MAX_LINE = 512
SQUEUE_TIMEOUT_S = 30.0  # the default of pools.read_timeout_s
USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
PENDING = "PENDING"


@dataclass(frozen=True, slots=True)
class JobLine:
    job_id: str
    state: str
    user: str
    uid: int | None
    walltime_s: int | None
    proxy_vo: str | None = None  # HTCondor: x509UserProxyVOName as the schedd recorded it


@dataclass(slots=True)
class Reading:
    """One cycle's view of the batch system."""

    jobs: list[JobLine] = field(default_factory=list)
    rejected: int = 0
    first_problem: str = ""

    @property
    def complete(self) -> bool:
        """Every line understood: only then may reclaim treat a job that is not here as gone."""
        return self.rejected == 0

    def reject(self, lineno: int, why: str) -> None:
        self.rejected += 1
        if not self.first_problem:
            self.first_problem = f"line {lineno}: {why}"[:200]


class JobSource(Protocol):
    """Where jobs come from (one call per cycle)."""

    name: str

    def read(self) -> Reading:
        """Every job the batch system knows now; raise TransientError when it cannot be read at all."""
        ...


# One pattern for a whole line (one regex call per line: 10,000 jobs parse in a few ms); the fields are the
# same checks as batch_hooks.context's JOB_ID_RE and provisioner.identity's user pattern.
LINE_RE = re.compile(r"^\s*(" + JOB_ID_RE.pattern.strip("^$") + r")\s*\|\s*([A-Z_]{1,32})\s*\|"
                     r"\s*([a-z_][a-z0-9_.-]{0,31})\s*\|\s*([0-9]{1,10})\s*\|\s*([^|]{1,32}?)\s*$")


def parse_squeue(text: str) -> Reading:
    """``squeue -o SQUEUE_FORMAT`` output -> jobs; lines that do not parse are counted, never guessed."""
    from batch_hooks.slurm import parse_walltime

    out = Reading()
    walltimes: dict[str, int | None] = {}  # a queue has few distinct limits: parse each once
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = LINE_RE.fullmatch(line) if len(line) <= MAX_LINE else None
        if m is None:
            fields = line.count("|") + 1
            out.reject(n, f"not 5 fields: {line[:60]!r}" if fields != 5 else f"malformed: {line[:60]!r}")
            continue
        job_id, state, user, uid, limit = m.groups()
        if int(uid) > 2**32 - 2:
            out.reject(n, f"uid {uid[:12]} out of range")
            continue
        if limit not in walltimes:
            try:
                walltimes[limit] = parse_walltime(limit)
            except ValidationError as err:
                out.reject(n, str(err))
                continue
        out.jobs.append(JobLine(job_id, state, user, int(uid), walltimes[limit]))
    return out


def run_bounded(argv: list[str], env: Mapping[str, str] | None, timeout_s: float,
                what: str) -> subprocess.CompletedProcess[bytes]:
    """Run a batch client with a hard deadline: at the deadline its whole process group is killed (a shell
    wrapper's children too, which would otherwise hold the output pipe open) and DeadlineExceeded names it."""
    import os
    import signal

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(env) if env is not None else None, start_new_session=True)
    except OSError as err:
        raise UnavailableError(f"{what}: {str(err)[:200]}") from None
    try:
        out, err_out = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=5)  # reap it; the group is dead, so the pipes close
        except subprocess.TimeoutExpired:  # something left the group and holds the pipes: stop reading
            proc.kill()
            proc.wait()
        raise DeadlineExceeded(f"{what} did not answer in {timeout_s:g} s; cut off") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err_out)


class SlurmSource:
    name = "slurm"

    def __init__(self, squeue: str = "squeue", env: Mapping[str, str] | None = None,
                 timeout_s: float = SQUEUE_TIMEOUT_S) -> None:
        self.argv = [squeue, "-h", "-a", "-r", "-t", "all", "-o", SQUEUE_FORMAT]
        self.env = dict(env) if env is not None else None
        self.timeout_s = timeout_s

    def read(self) -> Reading:
        done = run_bounded(self.argv, self.env, self.timeout_s, "squeue")
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()[:1]
            raise UnavailableError(f"squeue exited {done.returncode}: {(detail or [''])[0][:200]}")
        if len(done.stdout) > MAX_OUTPUT_BYTES:
            raise TransientError(f"squeue printed more than {MAX_OUTPUT_BYTES} bytes; refused")
        return parse_squeue(done.stdout.decode(errors="replace"))


# HTCondor JobStatus -> the squeue state names reclaim understands.
CONDOR_STATES = {1: "PENDING", 2: "RUNNING", 3: "CANCELLED", 4: "COMPLETED", 5: "HELD", 6: "RUNNING",
                 7: "SUSPENDED"}
CONDOR_PROJECTION = ["ClusterId", "ProcId", "GlobalJobId", "JobStatus", "Owner", "x509UserProxyVOName",
                     "MaxWallTimeMins"]


def parse_condor(ads: Iterable[Any]) -> Reading:
    """Schedd ClassAds (classad2.ClassAd or mappings) -> jobs, each field checked like squeue's."""
    from batch_hooks.htcondor import split_global_id
    from provisioner.catalogue.model import VO_RE

    out = Reading()
    for n, ad in enumerate(ads, 1):
        try:
            cluster, proc, status = int(ad.get("ClusterId")), int(ad.get("ProcId")), int(ad.get("JobStatus"))
            gid, owner = str(ad.get("GlobalJobId", "")), str(ad.get("Owner", ""))
            vo, wall = ad.get("x509UserProxyVOName"), ad.get("MaxWallTimeMins")
        except (TypeError, ValueError):
            out.reject(n, "ClusterId/ProcId/JobStatus not integers")
            continue
        try:
            _schedd, job_id = split_global_id(gid)  # the job id the HTCondor hooks give the job's VM
        except ValidationError:
            out.reject(n, f"malformed GlobalJobId of {cluster}.{proc}")
            continue
        ok = (USER_RE.fullmatch(owner) and status in CONDOR_STATES
              and 0 <= cluster < 10**9 and 0 <= proc < 10**7
              and (vo is None or (isinstance(vo, str) and VO_RE.fullmatch(vo)))
              and (wall is None or (isinstance(wall, int) and 0 < wall < 10**7)))
        if not ok:
            out.reject(n, f"malformed job ad {cluster}.{proc}")
            continue
        out.jobs.append(JobLine(job_id, CONDOR_STATES[status], owner, None,
                                wall * 60 if isinstance(wall, int) else None, vo))
    return out


# The schedd query runs in a child process killed at the deadline (as batch_hooks.condor_verify does):
# htcondor2 blocks in C++ holding the GIL, so a silent collector or schedd would stall the whole worker.
_QUERY_ALL = """
import json, sys
import htcondor2
projection = sys.argv[1].split(",")
ads = htcondor2.Schedd().query(constraint="true", projection=projection)
def plain(v):  # an expression (not a literal) becomes its text: parse_condor then refuses it, as before
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)
json.dump([{k: plain(ad.get(k)) for k in projection} for ad in ads], sys.stdout)
"""


class CondorSource:
    """One schedd query per cycle.  ``query``: canned ads (tests, benchmarks), run in-process; without it
    the real query runs in a child process with a hard deadline (``env``: its HTCondor configuration)."""

    name = "htcondor"

    def __init__(self, query: Callable[[], Iterable[Any]] | None = None, env: Mapping[str, str] | None = None,
                 timeout_s: float = SQUEUE_TIMEOUT_S) -> None:
        self.query = query
        self.env = dict(env) if env is not None else None
        self.timeout_s = timeout_s

    def read(self) -> Reading:
        if self.query is None:
            return parse_condor(self._child_query())
        try:
            ads = list(self.query())
        except DynvmError:
            raise
        except Exception as err:  # htcondor2.HTCondorException and friends: the schedd cannot be asked
            raise UnavailableError(f"htcondor schedd: {str(err)[:200]}") from None
        return parse_condor(ads)

    def _child_query(self) -> list[Any]:
        import json
        import sys

        argv = [sys.executable, "-c", _QUERY_ALL, ",".join(CONDOR_PROJECTION)]
        done = run_bounded(argv, self.env, self.timeout_s, "htcondor schedd query")
        if done.returncode != 0:
            last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no detail"])[-1]
            raise UnavailableError(f"htcondor schedd: {last[:200]}")
        if len(done.stdout) > MAX_OUTPUT_BYTES:
            raise TransientError(f"htcondor schedd query printed more than {MAX_OUTPUT_BYTES} bytes; refused")
        try:
            ads = json.loads(done.stdout)
        except ValueError:
            raise UnavailableError("htcondor schedd: garbled answer from the query") from None
        if not isinstance(ads, list) or not all(isinstance(a, dict) for a in ads):
            raise UnavailableError("htcondor schedd: garbled answer from the query")
        return ads


@dataclass(slots=True)
class VOResolver:
    """uid/user (or the schedd's proxy VO) -> VO through provisioner.identity, cached per cycle."""

    config: Config
    cache: dict[tuple[int | None, str, str | None], str | None] = field(default_factory=dict)

    def vo_of(self, job: JobLine) -> str | None:
        key = (job.uid, job.user, job.proxy_vo)
        if key not in self.cache:
            self.cache[key] = self._resolve(job)
        return self.cache[key]

    def _resolve(self, job: JobLine) -> str | None:
        import pwd

        from provisioner.identity import JobIdentity, resolve_vo

        try:
            uid = job.uid if job.uid is not None else pwd.getpwnam(job.user).pw_uid
            identity = JobIdentity.from_uid(uid, condor_proxy_vo=job.proxy_vo)
            if identity.user != job.user:
                return None  # the uid is someone else here: trust neither
            return resolve_vo(identity, self.config)
        except (KeyError, DynvmError):
            return None


@dataclass(frozen=True, slots=True)
class Demand:
    pending: dict[str, int]  # VO -> pending jobs
    unmapped: int  # pending jobs with no trusted VO
    jobs: dict[str, BatchJob] | None  # every job by id, None unless every line was understood
    rejected: int
    problem: str


def count(reading: Reading, resolver: VOResolver) -> Demand:
    pending: Counter[str] = Counter()
    unmapped = 0
    for job in reading.jobs:
        if job.state != PENDING:
            continue
        vo = resolver.vo_of(job)
        if vo is None:
            unmapped += 1
        else:
            pending[vo] += 1
    jobs = {j.job_id: BatchJob(j.job_id, j.state, j.walltime_s) for j in reading.jobs} if reading.complete \
        else None
    return Demand(dict(pending), unmapped, jobs, reading.rejected, reading.first_problem)


def source_for(config: Config, env: Mapping[str, str] | None = None) -> JobSource | None:
    """The configured batch system's reader, each read cut off after ``pools.read_timeout_s``."""
    timeout = config.pools.read_timeout_s
    if config.pools.batch == "slurm":
        return SlurmSource(env=env, timeout_s=timeout)
    if config.pools.batch == "htcondor":
        return CondorSource(env=env, timeout_s=timeout)
    return None
