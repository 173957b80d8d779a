"""Weighers: a score per host (higher wins) for a request, computed for all hosts at once.

least_loaded spreads (the seed's behaviour): the free fraction of vCPU plus memory left after placing.
pack fills hosts: the negative of that, so the fullest host that still fits wins.  Ties go to the first
host in name order (argmax), which keeps plans deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

from provisioner.scheduler.index import FloatArray
from provisioner.scheduler.types import PlacementRequest
from provisioner.scheduler.work import Work


def free_fraction_after(work: Work, req: PlacementRequest) -> FloatArray:
    free_v = (work.cap_v - work.used_v - req.vcpus) * work.inv_v
    free_m = (work.cap_m - work.used_m - req.memory_mib) * work.inv_m
    score: FloatArray = free_v + free_m
    return score


def least_loaded(work: Work, req: PlacementRequest) -> FloatArray:
    return free_fraction_after(work, req)


def pack(work: Work, req: PlacementRequest) -> FloatArray:
    score: FloatArray = -free_fraction_after(work, req)
    return score


Weigher = Callable[[Work, PlacementRequest], FloatArray]
WEIGHERS: dict[str, Weigher] = {
    "least_loaded": least_loaded,
    "pack": pack,
}
