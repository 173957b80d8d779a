"""schedule(): the one placement function, for a single request or a batch (failover reuses it).

Pure: it reads the snapshot's HostIndex and returns a Plan; it never touches Redis or libvirt.  The
caller commits the plan with the state store's atomic claims (which re-check capacity, so a stale
snapshot can make a claim fail but never overbook).
"""

from __future__ import annotations

import heapq

import numpy as np

from provisioner.errors import ValidationError
from provisioner.scheduler.filters import FILTERS, NON_CAPACITY_FILTERS, Filter, quota_problem
from provisioner.scheduler.index import BoolArray, HostIndex
from provisioner.scheduler.preempt import find_preemption
from provisioner.scheduler.types import (
    Explanation,
    FilterOutcome,
    PlacementRequest,
    Plan,
    SchedulerPolicy,
    Snapshot,
)
from provisioner.scheduler.weighers import WEIGHERS, Weigher
from provisioner.scheduler.work import Work

EXAMPLES_PER_FILTER = 3


def schedule(
    requests: list[PlacementRequest],
    snapshot: Snapshot | HostIndex,
    policy: SchedulerPolicy | None = None,
) -> Plan:
    """Place ``requests`` on the snapshot's hosts: critical tiers first, start_after honoured.

    Each placement updates the in-memory usage, anti-affinity and quota counters, so later requests of
    the batch see the earlier ones.  A request that does not fit may preempt strictly lower tiers.
    """
    policy = policy or SchedulerPolicy()
    index = snapshot if isinstance(snapshot, HostIndex) else HostIndex.for_snapshot(snapshot)
    weigh = WEIGHERS.get(policy.weigher)
    if weigh is None:
        raise ValidationError(f"scheduler.weigher: unknown weigher {policy.weigher!r}")
    ordered = order_requests(requests)
    work = Work(index, policy, {r.instance_id for r in requests})
    plan = Plan(order=[r.instance_id for r in ordered])
    for req in ordered:
        _place_one(work, req, plan, weigh)
    return plan


def _place_one(work: Work, req: PlacementRequest, plan: Plan, weigh: Weigher) -> None:
    problem = quota_problem(work, req)
    if problem is not None:
        plan.unplaced[req.instance_id] = Explanation(
            req.instance_id, work.index.n, (FilterOutcome("quota", 0, work.index.n, (("", problem),)),)
        )
        return
    eligible = _and_masks(work, req, NON_CAPACITY_FILTERS)
    ok = eligible & work.fits(req)
    if ok.any():
        scores = weigh(work, req)
        h = int(np.argmax(np.where(ok, scores, -np.inf)))
        work.place(h, req)
        plan.placements[req.instance_id] = work.index.names[h]
        return
    choice = find_preemption(work, req, eligible) if work.policy.preemption else None
    if choice is None:
        plan.unplaced[req.instance_id] = explain(work, req)
        return
    host = work.index.names[choice.host]
    for victim in choice.victims:
        work.evict(choice.host, victim)
        plan.preemptions[victim.id] = (
            f"preempted on {host} to make room for {req.instance_id} ({req.tier.value})"
        )
        plan.victim_hosts[victim.id] = host
    work.place(choice.host, req)
    plan.placements[req.instance_id] = host


def _and_masks(work: Work, req: PlacementRequest, filters: tuple[Filter, ...]) -> BoolArray:
    mask = filters[0].mask(work, req)
    for f in filters[1:]:
        mask = mask & f.mask(work, req)
    return mask


def explain(work: Work, req: PlacementRequest) -> Explanation:
    """Run the filters as a cascade and count the hosts each one turned away, with a few examples."""
    alive = work.index.all_hosts
    outcomes: list[FilterOutcome] = []
    for f in FILTERS:
        passing = f.mask(work, req)
        failed = alive & ~passing
        n_failed = int(failed.sum())
        examples = tuple(
            (work.index.names[h], f.reason(work, req, h))
            for h in np.flatnonzero(failed)[:EXAMPLES_PER_FILTER].tolist()
        )
        alive = alive & passing
        outcomes.append(FilterOutcome(f.name, int(alive.sum()), n_failed, examples))
    note = ""
    if req.tier.rank > 0 and work.policy.preemption:
        note = f"preempting tiers below {req.tier.value} would not make room either"
    return Explanation(req.instance_id, work.index.n, tuple(outcomes), note)


def order_requests(requests: list[PlacementRequest]) -> list[PlacementRequest]:
    """Highest tier first, but never before what it must start after (Kahn's algorithm on a heap)."""
    by_id = {r.instance_id: r for r in requests}
    if len(by_id) != len(requests):
        raise ValidationError("placement batch: duplicate instance ids")
    waiting_on: dict[str, set[str]] = {}
    dependants: dict[str, list[str]] = {r.instance_id: [] for r in requests}
    for r in requests:
        deps = {d for d in r.start_after if d in by_id and d != r.instance_id}
        waiting_on[r.instance_id] = deps
        for d in deps:
            dependants[d].append(r.instance_id)
    position = {r.instance_id: i for i, r in enumerate(requests)}
    rank = _inherited_ranks(by_id, dependants)
    heap = [(-rank[i], position[i], i) for i in by_id if not waiting_on[i]]
    heapq.heapify(heap)
    out: list[PlacementRequest] = []
    while heap:
        _, _, iid = heapq.heappop(heap)
        out.append(by_id[iid])
        for dep in dependants[iid]:
            waiting_on[dep].discard(iid)
            if not waiting_on[dep]:
                heapq.heappush(heap, (-rank[dep], position[dep], dep))
    if len(out) != len(requests):
        stuck = sorted(i for i, w in waiting_on.items() if w)
        raise ValidationError(f"placement batch: start_after cycle among {', '.join(stuck)}")
    return out


def _inherited_ranks(by_id: dict[str, PlacementRequest], dependants: dict[str, list[str]]) -> dict[str, int]:
    """A request's rank is at least that of anything waiting for it (else a critical service could
    queue behind a high one because its normal-tier database is placed late)."""
    rank: dict[str, int] = {}

    def visit(iid: str, path: frozenset[str]) -> int:
        if iid in rank:
            return rank[iid]
        best = by_id[iid].tier.rank
        for dep in dependants[iid]:
            if dep not in path:  # a cycle is reported by the caller
                best = max(best, visit(dep, path | {iid}))
        rank[iid] = best
        return best

    for iid in by_id:
        visit(iid, frozenset())
    return rank
