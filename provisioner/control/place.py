"""The control worker's job: plan and place one requested instance, then hand it to its host's agent.

Idempotent: a redelivered ``provision`` finds the instance no longer ``requested`` and does nothing, and two
concurrent deliveries cannot both place it (the requested -> placed transition is atomic; the loser gives
its capacity claim back).
"""

from __future__ import annotations

import logging
import os
import time

from provisioner.control.hostsview import HostsView
from provisioner.errors import ConflictError, NoCapacityError
from provisioner.messaging import PRIORITY_DEFAULT, PRIORITY_HA, host_queue
from provisioner.model import Instance, InstanceState, Tier
from provisioner.oplog import since
from provisioner.runtime import Runtime, try_claim
from provisioner.state.events import NewEvent

log = logging.getLogger(__name__)
CLAIM_ATTEMPTS = 4
# Why the atomic claim refused, in words (the codes of provisioner.state.claims.ClaimResult).
_REFUSED = {
    "capacity": "capacity taken by concurrent placements",
    "anti_affinity": "another member of its anti-affinity group took the host",
    "quota": "its VO's quota was reached",
    "no_lease": "the chosen host's agent holds no lease",
    "missing": "the chosen host is unknown",
}


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


class Unread:
    """place_instance's default: the caller did not read the record."""


UNREAD = Unread()


def place_instance(
    rt: Runtime, instance_id: str, final_attempt: bool = False, inst: Instance | Unread | None = UNREAD
) -> str | None:
    """Place a requested instance; returns the host, or None if there is nothing to do.  ``inst``: the
    record as the caller just read it (else it is read here).

    Raises NoCapacityError (retried) while capacity may still come; on the final attempt the instance is
    failed with the reason instead, so no request stays ``requested`` forever."""
    if isinstance(inst, Unread):
        inst = rt.store.get_instance(instance_id)
    if inst is None or inst.state is not InstanceState.REQUESTED:
        return inst.host if inst is not None else None
    try:
        return _place(rt, inst)
    except NoCapacityError as err:
        if not final_attempt:
            raise
        _fail(rt, inst, f"no capacity: {err}")
        return None


def _place(rt: Runtime, inst: Instance) -> str | None:
    from provisioner.scheduler import schedule

    policy = policy_for(rt)
    host: str | None = None
    refused = ""
    # Only anti-affinity, a VO quota or preemption need the other instances; skip reading them otherwise,
    # and then a view of the hosts a moment old will do (control/hostsview.py: the claim re-checks).
    light = inst.anti_affinity is None and (inst.vo is None or inst.vo not in policy.vo_quotas)
    view = hosts_view(rt)
    for _ in range(CLAIM_ATTEMPTS):
        if light:
            snap, fresh = view.snapshot(rt.store)
            plan = schedule([request_for(inst)], snap, policy)
            if inst.id in plan.unplaced and not fresh:  # perhaps only the view was behind: look again
                view.drop()
                plan = schedule([request_for(inst)], view.snapshot(rt.store)[0], policy)
        else:
            plan = schedule([request_for(inst)], rt.store.snapshot(), policy)
        if inst.id in plan.unplaced and light and inst.tier is not Tier.POOL:
            light = False  # preemption of lower tiers may make room: look at the instances
            plan = schedule([request_for(inst)], rt.store.snapshot(), policy)
        if inst.id in plan.unplaced:
            raise NoCapacityError(f"no host can take {inst.id}: {plan.unplaced[inst.id]}")
        candidate = plan.placements[inst.id]
        if plan.preemptions:
            preempt(rt, plan.preemptions, plan.victim_hosts, for_id=inst.id)
            raise NoCapacityError(
                f"{inst.id}: preempting {len(plan.preemptions)} lower-tier VM(s) on "
                f"{candidate}; will place when they are gone"
            )
        refused = try_claim(rt, candidate, inst)
        if refused == "ok":
            host = candidate
            view.claimed(candidate, inst.vcpus, inst.memory_mib)
            break
        view.drop()
        # Another worker took the capacity, the group's slot or the VO's quota between snapshot and claim
        # (or the host's agent is gone): re-plan on fresh state.
    if host is None:
        raise NoCapacityError(f"{inst.id}: {_REFUSED.get(refused, refused)} at commit")
    try:
        # Compare-and-set on the record this placement was planned from (state, host, epoch); a new epoch.
        placed = NewEvent("placed", f"{inst.image} on {host}", host=host, vo=inst.vo, duration_s=since(inst))
        rt.store.transition_from(inst, InstanceState.PLACED, bump_epoch=True, host=host, event=placed)
    except ConflictError:
        # A concurrent delivery placed it first; give our claim back unless it landed on the same host.
        winner = rt.store.get_instance(inst.id)
        if winner is None or winner.host != host:
            rt.store.release_claim(host, inst.id)
        return winner.host if winner is not None else None
    _fault_hold(rt, inst.id, host)
    priority = PRIORITY_HA if inst.tier in (Tier.CRITICAL, Tier.HIGH) else PRIORITY_DEFAULT
    from provisioner.messaging import BOOT

    rt.app.send_task(BOOT, args=[inst.id], queue=host_queue(host), priority=priority)
    return host


def hosts_view(rt: Runtime) -> HostsView:
    """This process's short-lived view of the hosts (one per runtime, shared by its worker threads)."""
    with rt.lock:
        if rt.hosts_view is None:
            rt.hosts_view = HostsView()
        return rt.hosts_view


def _fault_hold(rt: Runtime, instance_id: str, host: str) -> None:
    """Fault injection for tests (kill a control worker between placement and BOOT): while the file named by
    $DYNVM_FAULT_HOLD_AFTER_PLACE exists, a placement pauses after its record says placed, before the BOOT
    message is sent.  Unset in production: one environment lookup."""
    path = os.environ.get("DYNVM_FAULT_HOLD_AFTER_PLACE")
    if not path or not os.path.exists(path):
        return
    rt.store.add_event("fault_hold", f"BOOT held while {path} exists", instance=instance_id, host=host)
    deadline = time.monotonic() + rt.config.timeouts.provision_s
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _fail(rt: Runtime, inst: Instance, reason: str) -> None:
    try:
        rt.store.transition_from(inst, InstanceState.FAILED, reason=reason[:500])
    except ConflictError:
        return  # placed or released meanwhile: nothing to fail
    rt.store.add_event("failed", reason, instance=inst.id, vo=inst.vo, duration_s=since(inst))
    rt.store.notify(inst.id)


def preempt(rt: Runtime, victims: dict[str, str], hosts: dict[str, str], for_id: str) -> None:
    """Stop lower-tier VMs to make room; their owners (batch jobs) are requeued by the release path."""
    from provisioner.messaging import RELEASE

    for vid, why in victims.items():
        victim = rt.store.get_instance(vid)
        if victim is None or victim.host != hosts.get(vid):
            continue  # gone or moved since the plan was made: the next plan sees where it is
        try:
            rt.store.transition_from(
                victim, InstanceState.STOPPING, reason=f"preempted for {for_id}: {why}"[:500]
            )
        except ConflictError:
            continue  # already stopping or gone
        rt.store.add_event("preempted", instance=vid, host=hosts.get(vid), message=f"for {for_id}: {why}")
        host = hosts.get(vid)
        if host:
            rt.app.send_task(RELEASE, args=[vid], queue=host_queue(host), priority=PRIORITY_HA)
