"""Preemption: the cheapest set of lower-tier instances whose removal lets a request fit on some host.

Cheapest means, in this order: the lowest highest-tier among the victims (warm-pool workers before job
workers before lower service tiers), then the fewest victims, then the least capacity freed beyond need.
Equal and higher tiers are never victims.  A vectorised pass finds the lowest tier level at which any
host could make room and ranks hosts by their shortfall; only the best ``preemption_candidates`` hosts
are examined one by one, so the cost stays bounded on a large site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from provisioner.scheduler.index import BoolArray, Victim
from provisioner.scheduler.types import PlacementRequest
from provisioner.scheduler.work import Work


@dataclass(frozen=True, slots=True)
class Choice:
    host: int
    victims: tuple[Victim, ...]
    cost: tuple[int, int, int]


def find_preemption(work: Work, req: PlacementRequest, eligible: BoolArray) -> Choice | None:
    """Victims on one host among ``eligible`` (hosts passing every non-capacity filter), or None."""
    rank = req.tier.rank
    if rank == 0 or not eligible.any():
        return None
    free_v = work.cap_v - work.used_v
    free_m = work.cap_m - work.used_m
    for level in range(rank):  # highest victim rank allowed, lowest first
        ok = (
            eligible
            & (free_v + work.pre_v[level] >= req.vcpus)
            & (free_m + work.pre_m[level] >= req.memory_mib)
        )
        if not ok.any():
            continue
        hosts = np.flatnonzero(ok)
        if len(hosts) > work.policy.preemption_candidates:
            short = (
                np.maximum(req.vcpus - free_v[hosts], 0) / req.vcpus
                + np.maximum(req.memory_mib - free_m[hosts], 0) / req.memory_mib
            )
            hosts = hosts[np.argsort(short, kind="stable")[: work.policy.preemption_candidates]]
        best: Choice | None = None
        for h in hosts.tolist():
            victims = _victims_on(work, req, h, level, int(free_v[h]), int(free_m[h]))
            if victims is None:
                continue
            freed = sum(v.vcpus for v in victims)
            cost = (max(v.rank for v in victims), len(victims), freed)
            if best is None or cost < best.cost:
                best = Choice(h, tuple(victims), cost)
        if best is not None:
            return best
    return None


def _victims_on(
    work: Work, req: PlacementRequest, h: int, level: int, free_v: int, free_m: int
) -> list[Victim] | None:
    """Lowest tiers first, largest first within a tier, then drop whatever turned out unnecessary."""
    pool = [
        v
        for v in work.index.victims.get(h, ())
        if v.rank <= level and v.id not in work.preempted and v.id not in work.batch_ids
    ]
    pool.sort(key=lambda v: (v.rank, -max(v.vcpus / req.vcpus, v.memory_mib / req.memory_mib), v.id))
    need_v, need_m = req.vcpus - free_v, req.memory_mib - free_m
    chosen: list[Victim] = []
    got_v = got_m = 0
    for v in pool:
        if got_v >= need_v and got_m >= need_m:
            break
        chosen.append(v)
        got_v += v.vcpus
        got_m += v.memory_mib
    if got_v < need_v or got_m < need_m:
        return None
    # Undo in reverse so that the highest-tier (latest added) victims are spared first.
    for v in reversed(list(chosen)):
        if got_v - v.vcpus >= need_v and got_m - v.memory_mib >= need_m:
            chosen.remove(v)
            got_v -= v.vcpus
            got_m -= v.memory_mib
    return chosen
