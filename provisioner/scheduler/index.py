"""HostIndex: a snapshot turned into numpy arrays, built once and shared by every schedule() call.

The per-request work must stay well under a millisecond with 1,000 hosts and 10,000 instances, so nothing
here is touched per host in Python at scheduling time: capacity, usage and state are arrays, labels are
precomputed boolean masks and anti-affinity groups are per-group host-count arrays.  The index itself is
never mutated by scheduling; schedule() works on copies of the few arrays it changes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from provisioner.model import (
    CLAIMING_STATES,
    PLACEABLE_HOST_STATES,
    Host,
    HostState,
    Instance,
    InstanceState,
    Tier,
)
from provisioner.scheduler.types import Snapshot

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Instances in these states occupy a host for anti-affinity and may be counted there.
_ON_HOST_STATES = CLAIMING_STATES
# Only these can be preempted: a stopping or migrating VM is already on its way somewhere.
PREEMPTIBLE_STATES = frozenset(
    {InstanceState.PLACED, InstanceState.BOOTING, InstanceState.READY, InstanceState.DRAINING}
)
# States that count against a VO quota: those holding a claim, as the claim script counts them (a
# ``requested`` record does not count: otherwise a burst above the quota would block every one of its
# members, each seeing the others as using the quota).
_QUOTA_STATES = CLAIMING_STATES
# Ranks that may ever be preempted (anything below the top tier).
N_RANKS = max(t.rank for t in Tier)


@dataclass(frozen=True, slots=True)
class Victim:
    """A running instance that a higher tier may preempt."""

    id: str
    rank: int
    vcpus: int
    memory_mib: int
    vo: str | None
    group: str | None


class HostIndex:
    """Arrays over the snapshot's hosts (positions follow sorted host names, so ties break by name)."""

    def __init__(self, hosts: list[Host], instances: list[Instance]) -> None:
        hosts = sorted(hosts, key=lambda h: h.name)
        self.n = len(hosts)
        self.names: list[str] = [h.name for h in hosts]
        self.pos: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.states: list[HostState] = [h.state for h in hosts]
        self.cap_vcpus: IntArray = np.array([h.capacity.vcpus for h in hosts], dtype=np.int64)
        self.cap_mem: IntArray = np.array([h.capacity.memory_mib for h in hosts], dtype=np.int64)
        self.used_vcpus: IntArray = np.array([h.used_vcpus for h in hosts], dtype=np.int64)
        self.used_mem: IntArray = np.array([h.used_memory_mib for h in hosts], dtype=np.int64)
        self.placeable: BoolArray = np.array([h.state in PLACEABLE_HOST_STATES for h in hosts], dtype=bool)
        # A host whose lease is known to be gone (None: not read, e.g. a hand-built snapshot) takes nothing.
        self.lease_ok: BoolArray = np.array([h.lease_alive is not False for h in hosts], dtype=bool)
        self.all_hosts: BoolArray = np.ones(self.n, dtype=bool)
        self.no_hosts: BoolArray = np.zeros(self.n, dtype=bool)
        self._label_masks = self._build_label_masks(hosts)
        self._combined_labels: dict[tuple[tuple[str, str], ...], BoolArray] = {}
        self._effective: dict[tuple[float, float], tuple[IntArray, IntArray, FloatArray, FloatArray]] = {}
        self._build_instances(instances)

    @classmethod
    def for_snapshot(cls, snapshot: Snapshot) -> HostIndex:
        """The snapshot's index, built on first use and cached on the snapshot."""
        if snapshot._index is None:
            snapshot._index = cls(list(snapshot.hosts), list(snapshot.instances))
        index: HostIndex = snapshot._index
        return index

    def _build_label_masks(self, hosts: list[Host]) -> dict[tuple[str, str], BoolArray]:
        masks: dict[tuple[str, str], BoolArray] = {}
        for i, h in enumerate(hosts):
            for kv in h.labels.items():
                mask = masks.get(kv)
                if mask is None:
                    mask = masks[kv] = np.zeros(self.n, dtype=bool)
                mask[i] = True
        return masks

    def _build_instances(self, instances: list[Instance]) -> None:
        group_pos: dict[str, list[int]] = defaultdict(list)
        self.vo_vcpus: dict[str, int] = defaultdict(int)
        self.vo_count: dict[str, int] = defaultdict(int)
        self.quota_members: dict[str, Instance] = {}
        self.victims: dict[int, list[Victim]] = defaultdict(list)
        # pre_*[r, h]: resources on host h held by preemptible instances of rank <= r.
        self.pre_vcpus: IntArray = np.zeros((N_RANKS, self.n), dtype=np.int64)
        self.pre_mem: IntArray = np.zeros((N_RANKS, self.n), dtype=np.int64)
        for inst in instances:
            if inst.state in _QUOTA_STATES and inst.vo is not None:
                self.vo_vcpus[inst.vo] += inst.vcpus
                self.vo_count[inst.vo] += 1
                self.quota_members[inst.id] = inst
            h = self.pos.get(inst.host) if inst.host is not None else None
            if h is None or inst.state not in _ON_HOST_STATES:
                continue
            if inst.anti_affinity is not None:
                group_pos[inst.anti_affinity].append(h)
            rank = inst.tier.rank
            if inst.state in PREEMPTIBLE_STATES and rank < N_RANKS:
                self.victims[h].append(
                    Victim(inst.id, rank, inst.vcpus, inst.memory_mib, inst.vo, inst.anti_affinity)
                )
                self.pre_vcpus[rank:, h] += inst.vcpus
                self.pre_mem[rank:, h] += inst.memory_mib
        self.group_counts: dict[str, IntArray] = {
            g: np.bincount(np.array(p, dtype=np.int64), minlength=self.n).astype(np.int64)
            for g, p in group_pos.items()
        }

    def label_mask(self, labels: dict[str, str] | None) -> BoolArray:
        """Hosts carrying every required label (cached per label set)."""
        if not labels:
            return self.all_hosts
        key = tuple(sorted(labels.items()))
        mask = self._combined_labels.get(key)
        if mask is None:
            mask = self.all_hosts.copy()
            for kv in key:
                mask &= self._label_masks.get(kv, self.no_hosts)
            self._combined_labels[key] = mask
        return mask

    def effective(self, cpu_oc: float, mem_oc: float) -> tuple[IntArray, IntArray, FloatArray, FloatArray]:
        """Capacity with overcommit, ``floor(cap * factor)``, and its inverse (0 where capacity is 0)."""
        key = (cpu_oc, mem_oc)
        eff = self._effective.get(key)
        if eff is None:
            cv = np.floor(self.cap_vcpus * cpu_oc).astype(np.int64)
            cm = np.floor(self.cap_mem * mem_oc).astype(np.int64)
            with np.errstate(divide="ignore"):
                inv_v = np.where(cv > 0, 1.0 / np.maximum(cv, 1), 0.0)
                inv_m = np.where(cm > 0, 1.0 / np.maximum(cm, 1), 0.0)
            eff = self._effective[key] = (cv, cm, inv_v, inv_m)
        return eff
