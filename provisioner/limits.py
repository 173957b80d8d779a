"""Per-VO limits (maximum VMs, maximum vCPUs) and what happens to a VO over them: wait or fail.

Decide (pure): ``verdict(limits, usage, vcpus)`` and ``headroom(...)``.  Do: ``usage_of`` reads the VO's
books that the claim script keeps (``<prefix>:vomembers:<vo>`` and ``<prefix>:vovcpus``, changed only
together with the claims, so the numbers are those the placement commit itself enforces), and ``enforce``
turns a refusal into the error the hook reports:

  wait  -> VOLimitWait (transient): the batch system requeues the job, which starts when the VO is back
           under its limit; the reason is the error's message (Slurm: the job's AdminComment).
  fail  -> VOLimitExceeded (permanent): the job is held/failed with the reason, never requeued forever.

The claim script stays the final gate (two jobs racing for the last slot: one claim wins); this early
verdict gives the job its policy and a readable reason instead of a late "no capacity".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from provisioner.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from provisioner.runtime import Runtime


class OverLimit(StrEnum):
    WAIT = "wait"
    FAIL = "fail"


class VOLimitWait(TransientError):
    code = "vo_limit"
    exit_code = 4


class VOLimitExceeded(PermanentError):
    code = "vo_limit"
    exit_code = 4


@dataclass(frozen=True, slots=True)
class VOLimits:
    max_instances: int | None = None
    max_vcpus: int | None = None
    policy: OverLimit = OverLimit.WAIT


@dataclass(frozen=True, slots=True)
class VOUsage:
    instances: int = 0
    vcpus: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    admit: bool
    policy: OverLimit = OverLimit.WAIT
    reason: str = ""


def verdict(vo: str, limits: VOLimits, usage: VOUsage, vcpus: int) -> Verdict:
    """Whether one more VM of ``vcpus`` fits the VO's limits; if not, the policy and the reason."""
    if limits.max_instances is not None and usage.instances + 1 > limits.max_instances:
        why = f"VO {vo} runs {usage.instances} of at most {limits.max_instances} VMs"
        return Verdict(False, limits.policy, why)
    if limits.max_vcpus is not None and usage.vcpus + vcpus > limits.max_vcpus:
        why = f"VO {vo} uses {usage.vcpus} of at most {limits.max_vcpus} vCPUs and needs {vcpus} more"
        return Verdict(False, limits.policy, why)
    return Verdict(True, limits.policy)


def headroom(limits: VOLimits, usage: VOUsage, vcpus_each: int) -> int | None:
    """How many more VMs of ``vcpus_each`` the limits allow (None: unlimited)."""
    room: list[int] = []
    if limits.max_instances is not None:
        room.append(limits.max_instances - usage.instances)
    if limits.max_vcpus is not None:
        room.append((limits.max_vcpus - usage.vcpus) // max(vcpus_each, 1))
    return max(0, min(room)) if room else None


def limits_of(rt: Runtime, vo: str) -> VOLimits:
    vc = rt.config.vos.get(vo)
    if vc is None:
        return VOLimits()
    policy = OverLimit(getattr(vc, "over_limit", "wait"))
    return VOLimits(vc.max_instances, vc.max_vcpus, policy)


def usage_of(rt: Runtime, vo: str) -> VOUsage:
    keys = rt.store.keys
    pipe = rt.store.r.pipeline(transaction=True)  # one consistent read of both books
    pipe.hlen(keys.vo_members(vo))
    pipe.hget(keys.vo_vcpus, vo)
    n, v = pipe.execute()
    return VOUsage(int(n or 0), int(v or 0))


def enforce(rt: Runtime, vo: str, vcpus: int) -> None:
    """Raise VOLimitWait / VOLimitExceeded (per the VO's policy) if one more VM is over its limits."""
    limits = limits_of(rt, vo)
    if limits.max_instances is None and limits.max_vcpus is None:
        return
    v = verdict(vo, limits, usage_of(rt, vo), vcpus)
    if v.admit:
        return
    if v.policy is OverLimit.FAIL:
        raise VOLimitExceeded(f"{v.reason}: over its limit (policy fail)")
    raise VOLimitWait(f"{v.reason}: waiting until it is under its limit (policy wait)")


def enforce_for_job(rt: Runtime, vo: str, job_key: str, vcpus: int) -> None:
    """``enforce`` for a job that has no VM yet (a redelivered prolog's own VM is not held against it)."""
    from provisioner.breaker import redis_errors

    with redis_errors(rt.config.redis_url):
        if rt.store.instance_for_key(job_key) is None:
            enforce(rt, vo, vcpus)
