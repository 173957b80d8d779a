"""The one hook contract: what every batch system's hook knows about a job, validated, as a dataclass.

Every field is checked here, once, before it reaches a Redis key, a log line or a shell: a job's values
are hostile until proven otherwise (a comment, a job name and most of the environment are chosen by the
job's user).  The VO is *not* a field: the trusted side derives it from the uid (the pool account's group,
provisioner.identity) and never from anything the job typed.

Stdlib only: hooks start for every job, so this module is on the light path (see benchmarks/bench_hooks.py).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from provisioner.errors import ValidationError

# The job key and its parts' rules live with the store's idempotency (one format for every writer);
# HTCondor job ids ("schedd.example#12.0#1700000000") are reduced to "schedd.example.12.0" before this.
from provisioner.idempotency import CLUSTER_RE as CLUSTER_RE
from provisioner.idempotency import JOB_ID_RE as JOB_ID_RE
from provisioner.idempotency import MAX_ATTEMPT as MAX_ATTEMPT
from provisioner.idempotency import job_key as job_key

USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # partition, queue, node, host
MAX_CPUS = 4096
MAX_MEMORY_MIB = 64 * 1024 * 1024
MAX_WALLTIME_S = 366 * 24 * 3600


def _str(value: object, field: str, regex: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not regex.fullmatch(value):
        shown = repr(value)[:48]
        raise ValidationError(f"{field}: {shown} is not a valid value (expected {regex.pattern})")
    return value


def _int(value: object, field: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(f"{field}: {repr(value)[:48]} is not an integer in {lo}..{hi}")
    return value


@dataclass(frozen=True, slots=True)
class JobContext:
    """One attempt of one batch job, as its batch system (not its user) describes it."""

    batch: str  # "slurm", "htcondor", "lsf", "pbs", "sge"
    cluster: str
    job_id: str
    attempt: int  # Slurm restart count, HTCondor NumJobStarts...: a requeued job is a new attempt
    user: str
    uid: int
    gid: int
    cpus: int = 1
    memory_mib: int | None = None
    walltime_s: int | None = None
    partition: str | None = None  # partition / queue
    node: str | None = None  # the node the batch system started the job on

    def __post_init__(self) -> None:
        _str(self.batch, "batch", re.compile(r"^(slurm|htcondor|lsf|pbs|sge)$"))
        _str(self.cluster, "cluster", CLUSTER_RE)
        _str(self.job_id, "job id", JOB_ID_RE)
        _int(self.attempt, "attempt", 0, MAX_ATTEMPT)
        _str(self.user, "user", USER_RE)
        _int(self.uid, "uid", 0, 2**32 - 2)
        _int(self.gid, "gid", 0, 2**32 - 2)
        _int(self.cpus, "cpus", 1, MAX_CPUS)
        if self.memory_mib is not None:
            _int(self.memory_mib, "memory", 1, MAX_MEMORY_MIB)
        if self.walltime_s is not None:
            _int(self.walltime_s, "walltime", 1, MAX_WALLTIME_S)
        if self.partition is not None:
            _str(self.partition, "partition", NAME_RE)
        if self.node is not None:
            _str(self.node, "node", NAME_RE)

    @property
    def key(self) -> str:
        """(cluster, job id, attempt): the job's idempotency key; a requeued attempt gets a fresh VM."""
        return job_key(self.cluster, self.job_id, self.attempt)

    @property
    def owner(self) -> str:
        return f"{self.batch}:{self.cluster}:{self.job_id}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> JobContext:
        """From a request body; unknown or missing fields are a ValidationError, never a TypeError."""
        if not isinstance(data, dict):
            raise ValidationError("job context: expected an object")
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names)
        if extra:
            raise ValidationError(f"job context: unknown field {str(extra[0])[:32]!r}")
        try:
            return cls(**{k: data[k] for k in names if k in data})
        except TypeError as exc:
            raise ValidationError(f"job context: {exc}") from None
