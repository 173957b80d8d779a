"""At most one payload start per (instance, attempt): a run token taken with ``SET NX`` before the payload.

The payload goes straight from the job wrapper to the guest's exec channel, so no queue can redeliver it;
what is left is a replay of the wrapper itself (a batch system re-running a step, an operator re-running a
command, a retried hook).  Whoever starts a payload first takes ``<prefix>:run:<instance>:<attempt>``; any
later start of the same (instance, attempt) finds the token taken and is refused with ConflictError, even
after the first payload ended.  The token outlives any job (RUN_TOKEN_TTL_S) and goes with the VM's records.
"""

from __future__ import annotations

import re
import secrets
from typing import Protocol

from provisioner.errors import ConflictError, ValidationError

RUN_TOKEN_TTL_S = 90 * 24 * 3600  # longer than any walltime a site allows
ATTEMPT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SetNx(Protocol):
    """The one Redis call needed (redis-py's ``Redis.set`` and batch_hooks' light client both fit)."""

    def set(self, name: str, value: str, *, nx: bool = ..., ex: int | None = ...) -> object: ...


def run_key(prefix: str, instance_id: str, attempt: str) -> str:
    from provisioner.execchan.client import _ID_RE

    for value, what in ((prefix, "key prefix"), (instance_id, "instance id")):
        if not isinstance(value, str) or not _ID_RE.fullmatch(value):
            raise ValidationError(f"{what} {value!r:.64} is malformed (expected {_ID_RE.pattern})")
    if not isinstance(attempt, str) or not ATTEMPT_RE.fullmatch(attempt):
        raise ValidationError(f"run attempt {attempt!r:.64} is malformed (expected {ATTEMPT_RE.pattern})")
    return f"{prefix}:run:{instance_id}:{attempt}"


def take_run_token(r: SetNx, prefix: str, instance_id: str, attempt: str) -> str:
    """Take the token or raise ConflictError; returns the token's random value (for the logs)."""
    key = run_key(prefix, instance_id, attempt)
    value = secrets.token_hex(8)
    if not r.set(key, value, nx=True, ex=RUN_TOKEN_TTL_S):
        raise ConflictError(
            f"vm {instance_id}: attempt {attempt} has already started its payload (run token taken); "
            "a payload never starts twice"
        )
    return value
