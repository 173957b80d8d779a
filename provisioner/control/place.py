"""The control worker's job: plan and place one requested instance, then hand it to its host's agent.

Idempotent: a redelivered ``provision`` finds the instance no longer ``requested`` and does nothing, and two
concurrent deliveries cannot both place it (the requested -> placed transition is atomic; the loser gives
its capacity claim back).
"""

from __future__ import annotations

import logging

from provisioner.control.app import PRIORITY_DEFAULT, PRIORITY_HA, host_queue
from provisioner.control.runtime import Runtime
from provisioner.errors import ConflictError, NoCapacityError
from provisioner.model import Instance, InstanceState, Tier

log = logging.getLogger(__name__)
CLAIM_ATTEMPTS = 4


def policy_for(rt: Runtime):  # type: ignore[no-untyped-def]
    from provisioner.scheduler import SchedulerPolicy

    return SchedulerPolicy.from_config(rt.config)


def request_for(inst: Instance):  # type: ignore[no-untyped-def]
    from provisioner.scheduler import PlacementRequest

    return PlacementRequest(
        instance_id=inst.id,
        vcpus=inst.vcpus,
        memory_mib=inst.memory_mib,
        tier=inst.tier,
        vo=inst.vo,
        anti_affinity=inst.anti_affinity,
        pinned_host=inst.host if inst.state is InstanceState.REQUESTED and inst.host else None,
    )


def place_instance(rt: Runtime, instance_id: str, final_attempt: bool = False) -> str | None:
    """Place a requested instance; returns the host, or None if there is nothing to do."""
    from provisioner.scheduler import schedule

    inst = rt.store.get_instance(instance_id)
    if inst is None or inst.state is not InstanceState.REQUESTED:
        return inst.host if inst is not None else None
    policy = policy_for(rt)
    host: str | None = None
    for _ in range(CLAIM_ATTEMPTS):
        plan = schedule([request_for(inst)], rt.store.snapshot(), policy)
        if inst.id in plan.unplaced:
            why = str(plan.unplaced[inst.id])
            if final_attempt:
                _fail(rt, inst, f"no capacity: {why}")
                return None
            raise NoCapacityError(f"no host can take {inst.id}: {why}")
        candidate = plan.placements[inst.id]
        if rt.store.claim(candidate, inst.id, inst.vcpus, inst.memory_mib,
                          rt.config.scheduler.cpu_overcommit, rt.config.scheduler.memory_overcommit):
            host = candidate
            break
        # Another worker took the capacity between snapshot and claim: re-plan on fresh state.
    if host is None:
        raise NoCapacityError(f"capacity for {inst.id} was taken by concurrent placements; will retry")
    try:
        rt.store.transition(inst.id, InstanceState.PLACED, expected=InstanceState.REQUESTED, host=host)
    except ConflictError:
        # A concurrent delivery placed it first; give our claim back unless it landed on the same host.
        winner = rt.store.get_instance(inst.id)
        if winner is None or winner.host != host:
            rt.store.release_claim(host, inst.id)
        return winner.host if winner is not None else None
    rt.store.add_event("placed", instance=inst.id, host=host, message=f"{inst.image} on {host}")
    priority = PRIORITY_HA if inst.tier in (Tier.CRITICAL, Tier.HIGH) else PRIORITY_DEFAULT
    from provisioner.control.tasks import BOOT

    rt.app.send_task(BOOT, args=[inst.id], queue=host_queue(host), priority=priority)
    return host


def _fail(rt: Runtime, inst: Instance, reason: str) -> None:
    rt.store.transition(inst.id, InstanceState.FAILED, reason=reason)
    rt.store.add_event("failed", instance=inst.id, message=reason)
    rt.store.notify(inst.id)
