"""HTCondor starter hooks (``STARTER_JOB_HOOK_KEYWORD = DYNVM``; deploy/htcondor/).

Both run with the job's own privileges, so everything they send is a *claim*: the trusted daemon looks the
job up in the schedd by GlobalJobId and takes the owner (-> pool-account group -> VO) from the schedd's
copy (batch_hooks.condor_verify), never from the ad on stdin.  They authenticate to Redis as the starter
ACL user, which may only push onto ``<prefix>:hooks:condor`` and read replies.

PREPARE_JOB: job ad on stdin -> request -> on success print attributes for the job ad
             (``DynvmVM = "..."``, ``DynvmVMHost = "..."``) and exit 0; on failure one line on stderr and
             exit 1 (the starter puts the job on hold, HoldReasonCode 19 HookPrepareJobFailure).
JOB_EXIT:    ``exit|remove|hold|evict`` as argument, final ad on stdin -> release; exit 0 (ignored anyway).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from batch_hooks.context import JobContext
from provisioner.errors import DynvmError, ValidationError

GLOBAL_ID_RE = re.compile(r"^([A-Za-z0-9_.@-]{1,128})#([0-9]{1,10})\.([0-9]{1,7})#([0-9]{1,12})$")
MAX_AD_BYTES = 1024 * 1024
EXIT_REASONS = ("exit", "remove", "hold", "evict")


def read_ad(source: TextIO) -> Any:
    """The job ad as the starter writes it (old ClassAd syntax, one attribute per line)."""
    import classad2

    text = source.read(MAX_AD_BYTES + 1)
    if len(text) > MAX_AD_BYTES:
        raise ValidationError(f"job ad on stdin is longer than {MAX_AD_BYTES} bytes")
    try:
        return classad2.parseOne(text)
    except Exception as exc:  # classad2 raises ValueError/ClassAdException variants for junk
        raise ValidationError(f"job ad on stdin does not parse: {str(exc)[:100]}") from None


def _int_attr(ad: Any, name: str, default: int | None) -> int | None:
    value = ad.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = ad.eval(name)
        except Exception:
            value = None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(f"job ad: {name} is not an integer")
    return value


def split_global_id(global_id: object) -> tuple[str, str]:
    """(cluster = schedd name, job id = cluster.proc.qdate) from ``schedd#12.0#1700000000``."""
    if not isinstance(global_id, str) or not (m := GLOBAL_ID_RE.fullmatch(global_id)):
        raise ValidationError(f"job ad: GlobalJobId {str(global_id)[:64]!r} is malformed")
    schedd = re.sub(r"[^A-Za-z0-9_.-]", "_", m.group(1))[:64]
    return schedd, f"{m.group(2)}.{m.group(3)}.{m.group(4)}"


def context_from_ad(ad: Any) -> tuple[JobContext, str]:
    """The job as its ad claims it (the daemon checks the owner against the schedd) + its GlobalJobId."""
    import pwd

    global_id = ad.get("GlobalJobId")
    schedd, job_id = split_global_id(global_id)
    owner = ad.get("Owner")
    if not isinstance(owner, str):
        raise ValidationError("job ad: Owner is missing")
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise ValidationError(f"job ad: Owner {owner[:32]!r} has no passwd entry here") from None
    memory = _int_attr(ad, "RequestMemory", None)
    ctx = JobContext(
        batch="htcondor", cluster=schedd, job_id=job_id, attempt=_int_attr(ad, "NumJobStarts", 0) or 0,
        user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, cpus=_int_attr(ad, "RequestCpus", 1) or 1,
        memory_mib=memory or None,
    )
    return ctx, str(global_id)


def prepare_job(env: Mapping[str, str], stdin: TextIO, out: TextIO, err: TextIO) -> int:
    from batch_hooks.hookcfg import connect, prefix, prolog_timeout
    from batch_hooks.proto import call

    try:
        ctx, global_id = context_from_ad(read_ad(stdin))
        with connect(env) as r:
            vm = call(r, prefix(env), "condor_prepare", ctx, prolog_timeout(env), global_id=global_id)
        out.write(f'DynvmVM = "{vm["instance"]}"\nDynvmVMHost = "{vm["host"]}"\n')
        return 0
    except DynvmError as exc:
        err.write(f"dynvm prepare_job: {exc}\n")
        return 1


def job_exit(reason: str, env: Mapping[str, str], stdin: TextIO, err: TextIO) -> int:
    from batch_hooks.hookcfg import connect, prefix
    from batch_hooks.proto import call

    try:
        if reason not in EXIT_REASONS:
            known = ", ".join(EXIT_REASONS)
            raise ValidationError(f"job_exit: unknown reason {reason[:16]!r} (expected {known})")
        ctx, global_id = context_from_ad(read_ad(stdin))
        with connect(env) as r:
            call(r, prefix(env), "condor_exit", ctx, 60.0, global_id=global_id)
    except DynvmError as exc:
        err.write(f"dynvm job_exit: {exc}\n")
    return 0


def main(argv: list[str], env: Mapping[str, str]) -> int:
    if argv[:1] == ["prepare-job"] and len(argv) == 1:
        return prepare_job(env, sys.stdin, sys.stdout, sys.stderr)
    if argv[:1] == ["job-exit"] and len(argv) == 2:
        return job_exit(argv[1], env, sys.stdin, sys.stderr)
    sys.stderr.write("usage: python -m batch_hooks htcondor prepare-job | job-exit REASON\n")
    return 2
