"""The mutable side of one schedule() call: usage arrays and counters updated as a batch is placed.

Copies are taken of what changes (two small arrays, the touched anti-affinity groups, the VO counters) so
the shared HostIndex stays untouched and schedule() stays a pure function of its inputs.
"""

from __future__ import annotations

from provisioner.scheduler.index import BoolArray, FloatArray, HostIndex, IntArray, Victim
from provisioner.scheduler.types import PlacementRequest, SchedulerPolicy


class Work:
    def __init__(self, index: HostIndex, policy: SchedulerPolicy, batch_ids: set[str]) -> None:
        self.index = index
        self.policy = policy
        self.used_v: IntArray = index.used_vcpus.copy()
        self.used_m: IntArray = index.used_mem.copy()
        eff = index.effective(policy.cpu_overcommit, policy.memory_overcommit)
        self.cap_v: IntArray = eff[0]
        self.cap_m: IntArray = eff[1]
        self.inv_v: FloatArray = eff[2]
        self.inv_m: FloatArray = eff[3]
        self._groups: dict[str, IntArray] = {}
        self.vo_v: dict[str, int] = dict(index.vo_vcpus)
        self.vo_n: dict[str, int] = dict(index.vo_count)
        # A request for an instance that already has a record must not count against its own quota.
        for iid in batch_ids:
            inst = index.quota_members.get(iid)
            if inst is not None and inst.vo is not None:
                self.vo_v[inst.vo] -= inst.vcpus
                self.vo_n[inst.vo] -= 1
        self.batch_ids = batch_ids
        self.preempted: set[str] = set()
        self._pre_v: IntArray | None = None  # copied on the first preemption only
        self._pre_m: IntArray | None = None

    def group_counts(self, group: str) -> IntArray | None:
        counts = self._groups.get(group)
        return counts if counts is not None else self.index.group_counts.get(group)

    def _own_group(self, group: str) -> IntArray:
        counts = self._groups.get(group)
        if counts is None:
            base = self.index.group_counts.get(group)
            counts = base.copy() if base is not None else self.index.used_vcpus * 0
            self._groups[group] = counts
        return counts

    @property
    def pre_v(self) -> IntArray:
        return self._pre_v if self._pre_v is not None else self.index.pre_vcpus

    @property
    def pre_m(self) -> IntArray:
        return self._pre_m if self._pre_m is not None else self.index.pre_mem

    def place(self, h: int, req: PlacementRequest) -> None:
        self.used_v[h] += req.vcpus
        self.used_m[h] += req.memory_mib
        if req.anti_affinity is not None:
            self._own_group(req.anti_affinity)[h] += 1
        if req.vo is not None:
            self.vo_v[req.vo] = self.vo_v.get(req.vo, 0) + req.vcpus
            self.vo_n[req.vo] = self.vo_n.get(req.vo, 0) + 1

    def evict(self, h: int, victim: Victim) -> None:
        """Account for a preempted instance: its resources, group slot and quota are freed."""
        if self._pre_v is None or self._pre_m is None:
            self._pre_v = self.index.pre_vcpus.copy()
            self._pre_m = self.index.pre_mem.copy()
        self.preempted.add(victim.id)
        self.used_v[h] -= victim.vcpus
        self.used_m[h] -= victim.memory_mib
        self._pre_v[victim.rank :, h] -= victim.vcpus
        self._pre_m[victim.rank :, h] -= victim.memory_mib
        if victim.group is not None:
            self._own_group(victim.group)[h] -= 1
        if victim.vo is not None and victim.vo in self.vo_v:
            self.vo_v[victim.vo] -= victim.vcpus
            self.vo_n[victim.vo] -= 1

    def fits(self, req: PlacementRequest) -> BoolArray:
        fit: BoolArray = (self.used_v + req.vcpus <= self.cap_v) & (
            self.used_m + req.memory_mib <= self.cap_m
        )
        return fit
