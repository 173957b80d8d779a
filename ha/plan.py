"""Failover planning and the capacity reserve: pure functions over a snapshot (decide; ha's engine does).

All of a dead host's service VMs are planned in ONE batch through the one scheduler (most critical first,
anti-affinity and start-after honoured, lower tiers preempted when capacity is short), so the plan can be
committed atomically with ``StateStore.claim_batch``.  Worker VMs of a dead host are not restarted: their
jobs are requeued through the batch system.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from provisioner.model import HostState, Instance, InstanceState, Role, Tier
from provisioner.scheduler import Explanation, PlacementRequest, SchedulerPolicy, Snapshot, schedule

# Service records that stand for a VM that ran (or was being started) on the dead host.
RESTARTABLE = frozenset(
    {
        InstanceState.PLACED,
        InstanceState.BOOTING,
        InstanceState.READY,
        InstanceState.DRAINING,
        InstanceState.MIGRATING,
        InstanceState.LOST,
    }
)
# Worker records whose job must be requeued when their host dies.
WORKER_LIVE = frozenset(
    {InstanceState.PLACED, InstanceState.BOOTING, InstanceState.READY, InstanceState.DRAINING}
)


@dataclass(slots=True)
class FailoverPlan:
    dead_host: str
    placements: dict[str, str] = field(default_factory=dict)  # service id -> surviving host
    order: list[str] = field(default_factory=list)  # start order (most critical first)
    preemptions: dict[str, str] = field(default_factory=dict)  # victim id -> reason
    victim_hosts: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, Explanation] = field(default_factory=dict)
    workers_lost: list[str] = field(default_factory=list)  # worker ids whose jobs are requeued

    @property
    def complete(self) -> bool:
        return not self.unplaced


def without_host(snapshot: Snapshot, host: str) -> Snapshot:
    """The snapshot as if ``host`` were dead: it takes nothing and its instances occupy no survivor."""
    hosts = tuple(
        dataclasses.replace(h, state=HostState.DEAD) if h.name == host else h for h in snapshot.hosts
    )
    insts = tuple(i for i in snapshot.instances if i.host != host)
    return Snapshot(hosts=hosts, instances=insts, taken_at=snapshot.taken_at)


def services_on(snapshot: Snapshot, host: str, tiers: frozenset[Tier] | None = None) -> list[Instance]:
    return [
        i
        for i in snapshot.instances
        if i.host == host
        and i.role is Role.SERVICE
        and i.state in RESTARTABLE
        and (tiers is None or i.tier in tiers)
    ]


def plan_failover(
    snapshot: Snapshot,
    dead_host: str,
    policy: SchedulerPolicy,
    start_after: Mapping[str, tuple[str, ...]] | None = None,
    tiers: frozenset[Tier] | None = None,
) -> FailoverPlan:
    """Where each service VM of ``dead_host`` restarts.  ``start_after``: instance id -> ids it waits for."""
    services = services_on(snapshot, dead_host, tiers)
    after = start_after or {}
    requests = [
        PlacementRequest.for_instance(s, start_after=tuple(after.get(s.id, ()))) for s in services
    ]
    plan = schedule(requests, without_host(snapshot, dead_host), policy)
    out = FailoverPlan(
        dead_host=dead_host,
        placements=dict(plan.placements),
        order=list(plan.order),
        preemptions=dict(plan.preemptions),
        victim_hosts=dict(plan.victim_hosts),
        unplaced=dict(plan.unplaced),
    )
    out.workers_lost = sorted(
        i.id
        for i in snapshot.instances
        if i.host == dead_host and i.role is Role.WORKER and i.state in WORKER_LIVE
    )
    return out


@dataclass(frozen=True, slots=True)
class Reserve:
    """Whether the survivors could take every critical service if any one host died."""

    ok: bool
    uncovered: dict[str, list[str]]  # host whose death would leave these critical services unplaced

    def __str__(self) -> str:
        if self.ok:
            return "ok: any single host failure leaves room for every critical service"
        return "; ".join(f"if {h} dies: no room for {', '.join(ids)}" for h, ids in self.uncovered.items())


def capacity_reserve(snapshot: Snapshot, policy: SchedulerPolicy) -> Reserve:
    """Admission control: simulate each watched host's death and plan its critical services."""
    uncovered: dict[str, list[str]] = {}
    for host in snapshot.hosts:
        if host.state in (HostState.DEAD, HostState.FENCED):
            continue
        plan = plan_failover(snapshot, host.name, policy, tiers=frozenset({Tier.CRITICAL}))
        if plan.unplaced:
            uncovered[host.name] = sorted(plan.unplaced)
    return Reserve(ok=not uncovered, uncovered=uncovered)
