"""Filters: each answers "which hosts pass" for a whole array at once, and why one host failed.

``mask`` is the hot path (vectorised, no per-host Python); ``reason`` is only called to explain a
failure, for a handful of hosts.  The cascade order is the order of FILTERS.
"""

from __future__ import annotations

from typing import Protocol

from provisioner.scheduler.index import BoolArray
from provisioner.scheduler.types import PlacementRequest
from provisioner.scheduler.work import Work


class Filter(Protocol):
    name: str

    def mask(self, work: Work, req: PlacementRequest) -> BoolArray:
        """True for the hosts that pass."""

    def reason(self, work: Work, req: PlacementRequest, h: int) -> str:
        """Why host position ``h`` fails (a few words)."""


class StateFilter:
    """Only hosts in a placeable state (up) take new VMs."""

    name = "state"

    def mask(self, work: Work, req: PlacementRequest) -> BoolArray:
        return work.index.placeable

    def reason(self, work: Work, req: PlacementRequest, h: int) -> str:
        return f"host is {work.index.states[h].value}"


class LeaseFilter:
    """Only hosts whose agent holds the lease: an up host whose agent is gone (stopped, crashed, or a host
    left over from an earlier farm) would accept a placement that no agent ever picks up."""

    name = "lease"

    def mask(self, work: Work, req: PlacementRequest) -> BoolArray:
        return work.index.lease_ok

    def reason(self, work: Work, req: PlacementRequest, h: int) -> str:
        return "lease expired (no agent renewing it)"


class PinnedFilter:
    """The WNoDeS case: a job's VM goes on the job's own node or nowhere."""

    name = "pinned"

    def mask(self, work: Work, req: PlacementRequest) -> BoolArray:
        if req.pinned_host is None:
            return work.index.all_hosts
        mask = work.index.no_hosts.copy()
        h = work.index.pos.get(req.pinned_host)
        if h is not None:
            mask[h] = True
        return mask

    def reason(self, work: Work, req: PlacementRequest, h: int) -> str:
        return f"not the pinned host {req.pinned_host}"


class LabelFilter:
    name = "labels"

    def mask(self, work: Work, req: PlacementRequest) -> BoolArray:
        return work.index.label_mask(dict(req.labels) if req.labels else None)

    def reason(self, work: Work, req: PlacementRequest, h: int) -> str:
        have = work.index.label_mask
        missing = [f"{k}={v}" for k, v in sorted(req.labels.items()) if not have({k: v})[h]]
        return "lacks " + ",".join(missing)


class AntiAffinityFilter:
    """No two instances of one group on a host, counting those placed earlier in the same batch."""

    name = "anti_affinity"

    def mask(self, work: Work, req: PlacementRequest) -> BoolArray:
        if req.anti_affinity is None:
            return work.index.all_hosts
        counts = work.group_counts(req.anti_affinity)
        if counts is None:
            return work.index.all_hosts
        mask: BoolArray = counts == 0
        return mask

    def reason(self, work: Work, req: PlacementRequest, h: int) -> str:
        return f"already runs a member of group {req.anti_affinity}"


class CapacityFilter:
    name = "capacity"

    def mask(self, work: Work, req: PlacementRequest) -> BoolArray:
        return work.fits(req)

    def reason(self, work: Work, req: PlacementRequest, h: int) -> str:
        free_v = int(work.cap_v[h] - work.used_v[h])
        free_m = int(work.cap_m[h] - work.used_m[h])
        if req.vcpus > free_v:
            return f"needs {req.vcpus} vCPU, has {max(free_v, 0)} free"
        return f"needs {req.memory_mib} MiB, has {max(free_m, 0)} MiB free"


FILTERS: tuple[Filter, ...] = (
    StateFilter(),
    LeaseFilter(),
    PinnedFilter(),
    LabelFilter(),
    AntiAffinityFilter(),
    CapacityFilter(),
)
# Every filter except capacity: the hosts where preemption could make room.
NON_CAPACITY_FILTERS: tuple[Filter, ...] = tuple(f for f in FILTERS if f.name != "capacity")


def quota_problem(work: Work, req: PlacementRequest) -> str | None:
    """Why the request's VO quota forbids it, or None.  Quotas are per request, not per host."""
    if req.vo is None:
        return None
    quota = work.policy.quota(req.vo)
    if quota is None:
        return None
    used_v = work.vo_v.get(req.vo, 0)
    used_n = work.vo_n.get(req.vo, 0)
    if quota.max_instances is not None and used_n + 1 > quota.max_instances:
        return f"vo {req.vo} runs {used_n} of max {quota.max_instances} instances"
    if quota.max_vcpus is not None and used_v + req.vcpus > quota.max_vcpus:
        return f"vo {req.vo} uses {used_v} of max {quota.max_vcpus} vCPU, needs {req.vcpus}"
    return None
