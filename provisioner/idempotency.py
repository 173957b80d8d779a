"""Idempotency keys of batch jobs: one key per job *attempt*.

A requeued Slurm job keeps its job id, so a key of (cluster, job id) alone would hand a requeued job's
prolog the VM of its previous, ended attempt.  The key therefore includes the attempt (Slurm's restart
count, HTCondor's run count); the store maps a key to a live instance only (create_instance.lua), so an
ended VM never satisfies it either.  The format is the one batch_hooks.context.job_key writes:
``job:CLUSTER:JOBID:ATTEMPT``.  Light (stdlib + errors): the batch hooks import it.
"""

from __future__ import annotations

import re

from provisioner.errors import ValidationError
from provisioner.ids import check_id

CLUSTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Slurm ("123", "123_4" array task, "123+1" het component) and HTCondor ("schedd.12.0") ids; ':' is the
# key separator, so never part of a component.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+@-]{0,127}$")
_PLAIN_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
MAX_ATTEMPT = 1_000_000


def _token(value: object, what: str, regex: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not regex.fullmatch(value):
        shown = repr(value)[:48]
        raise ValidationError(f"{what}: {shown} is not valid (expected {regex.pattern})")
    return value


def job_key(cluster: str, job_id: str, attempt: int) -> str:
    """The idempotency key of one attempt of a batch job; ValidationError names a bad part.

    Job ids outside the key alphabet ('+', '@') are hex-encoded behind a '-' that no plain id starts with,
    so "123_1" and "123+1" never share a key.  The result passes keys.check_id (it becomes a Redis key).
    """
    _token(cluster, "cluster", CLUSTER_RE)
    _token(job_id, "job id", JOB_ID_RE)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 0 <= attempt <= MAX_ATTEMPT:
        raise ValidationError(f"attempt: {str(attempt)[:24]!r} is not an integer in 0..{MAX_ATTEMPT}")
    part = job_id if _PLAIN_RE.fullmatch(job_id) else "-" + job_id.encode().hex()
    return check_id(f"job:{cluster}:{part}:{attempt}", "idempotency key")
