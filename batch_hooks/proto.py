"""Hook request/reply over Redis: the keys, the request body, and the hook side of a call (light path).

A trusted hook (Slurm's PrologSlurmctld/EpilogSlurmctld as root, a generic prolog as root) LPUSHes one JSON
request onto ``<prefix>:hooks`` and BLPOPs its answer from ``<prefix>:hookreply:<random id>``; a trusted
daemon (the control worker, or ``dynvm hook serve``) does the work (batch_hooks.server).  Requests carry an
expiry in Redis's clock: a daemon that comes back late drops requests nobody waits for any more.

Per job attempt the daemon keeps ``<prefix>:jobvm:<job key>`` (the job's VM) and a Redis ACL user that may
read only that record and take only that VM's run token: what the untrusted side of a job (TaskProlog,
payload wrapper) needs, and nothing that could provision, release or reach another job's VM.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from batch_hooks.context import JobContext
from batch_hooks.resp import LightRedis
from provisioner.errors import (
    ConflictError,
    DeadlineExceeded,
    DynvmError,
    IdentityError,
    NotFoundError,
    PermanentError,
    TransientError,
    UnknownVOError,
    ValidationError,
)

TRUSTED_OPS = frozenset({"prolog", "epilog"})  # root hooks: <prefix>:hooks
# HTCondor starter hooks (the job's user): <prefix>:hooks:condor
CONDOR_OPS = frozenset({"condor_prepare", "condor_exit"})
OPS = TRUSTED_OPS | CONDOR_OPS
REPLY_TTL_S = 120
MAX_REQUEST_BYTES = 16 * 1024
_PERMANENT_CLASSES = (ValidationError, NotFoundError, UnknownVOError, IdentityError, ConflictError)
PERMANENT: dict[str, type[PermanentError]] = {c.code: c for c in _PERMANENT_CLASSES}


def hooks_key(prefix: str) -> str:
    return f"{prefix}:hooks"


def condor_hooks_key(prefix: str) -> str:
    """Requests of untrusted callers: the daemon checks every claim in them against the schedd."""
    return f"{prefix}:hooks:condor"


def reply_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:hookreply:{request_id}"


def jobvm_key(prefix: str, job_key: str) -> str:
    return f"{prefix}:jobvm:{job_key}"


def jobvms_key(prefix: str) -> str:
    """Set of the job keys that have a VM recorded (live jobs)."""
    return f"{prefix}:jobvms"


def job_acl_user(prefix: str, job_key: str) -> str:
    return f"{prefix}-{job_key}"


def call(
    r: LightRedis, prefix: str, op: str, ctx: JobContext, timeout_s: float, **extra: Any
) -> dict[str, Any]:
    """Send one request and wait for its answer until ``timeout_s``; errors come back as DynvmErrors."""
    if op not in OPS:
        raise ValidationError(f"hook: unknown operation {op!r}")
    request_id = secrets.token_hex(16)
    now = r.execute("TIME")
    assert isinstance(now, list) and isinstance(now[0], bytes)
    body = {"v": 1, "op": op, "ctx": ctx.to_dict(), "reply": request_id,
            "expires": int(now[0]) + timeout_s, **extra}
    r.lpush(condor_hooks_key(prefix) if op in CONDOR_OPS else hooks_key(prefix), json.dumps(body))
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        got = r.blpop(reply_key(prefix, request_id), min(left, 5.0))
        if got is not None:
            return decode_reply(got)
    raise DeadlineExceeded(f"dynvm did not answer the {op} of job {ctx.job_id} in {timeout_s:.0f} s")


def decode_reply(raw: bytes) -> dict[str, Any]:
    answer = json.loads(raw)
    if not isinstance(answer, dict):
        raise TransientError("hook: garbled answer")
    if "error" in answer:
        message = str(answer.get("message", "dynvm error"))[:400]
        if answer.get("transient"):
            cls: type[DynvmError] = DeadlineExceeded if answer["error"] == "timeout" else TransientError
            raise cls(message)
        raise PERMANENT.get(str(answer["error"]), PermanentError)(message)
    return answer
