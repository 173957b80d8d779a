"""The scheduler's inputs and outputs: plain, immutable-ish dataclasses (no I/O, no Redis).

``Snapshot`` is defined here rather than in provisioner.state so that importing the (pure) scheduler never
imports redis; the state store builds Snapshots, the scheduler consumes them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from provisioner.errors import ValidationError
from provisioner.model import Host, Instance, Tier

if TYPE_CHECKING:
    from provisioner.config import Config

ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """One VM to place.  ``pinned_host`` is the WNoDeS case: the job's node is itself the hypervisor."""

    instance_id: str
    vcpus: int
    memory_mib: int
    tier: Tier = Tier.WORKER
    vo: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    anti_affinity: str | None = None
    pinned_host: str | None = None
    start_after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not ID_RE.match(self.instance_id):
            raise ValidationError(f"placement request: instance id {self.instance_id!r} is malformed")
        if self.vcpus < 1 or self.memory_mib < 1:
            raise ValidationError(
                f"placement request {self.instance_id}: vcpus={self.vcpus} memory_mib={self.memory_mib}"
                " must both be >= 1"
            )

    @classmethod
    def for_instance(cls, inst: Instance, **overrides: Any) -> PlacementRequest:
        """The request that re-places an existing instance record (failover, provisioning)."""
        base: dict[str, Any] = {
            "instance_id": inst.id,
            "vcpus": inst.vcpus,
            "memory_mib": inst.memory_mib,
            "tier": inst.tier,
            "vo": inst.vo,
            "anti_affinity": inst.anti_affinity,
        }
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True, slots=True)
class VOQuota:
    max_vcpus: int | None = None
    max_instances: int | None = None


@dataclass(frozen=True, slots=True)
class SchedulerPolicy:
    """How to choose.  Capacity with overcommit is ``floor(capacity * factor)`` (the claim script agrees)."""

    weigher: Literal["least_loaded", "pack"] = "least_loaded"
    cpu_overcommit: float = 1.0
    memory_overcommit: float = 1.0
    # Per-VO limits; a (max_vcpus, max_instances) tuple is accepted and turned into a VOQuota.
    vo_quotas: Mapping[str, VOQuota | tuple[int | None, int | None]] = field(default_factory=dict)
    preemption: bool = True
    # Hosts examined in detail when looking for victims (the cheapest by a vectorised pre-ranking).
    preemption_candidates: int = 32

    def __post_init__(self) -> None:
        quotas: dict[str, VOQuota] = {}
        for vo, q in self.vo_quotas.items():
            quotas[vo] = q if isinstance(q, VOQuota) else VOQuota(*q)
        object.__setattr__(self, "vo_quotas", quotas)

    def quota(self, vo: str) -> VOQuota | None:
        q = self.vo_quotas.get(vo)
        return VOQuota(*q) if isinstance(q, tuple) else q

    @classmethod
    def from_config(cls, cfg: Config) -> SchedulerPolicy:
        quotas = {
            name: VOQuota(max_vcpus=vo.max_vcpus, max_instances=vo.max_instances)
            for name, vo in cfg.vos.items()
            if vo.max_vcpus is not None or vo.max_instances is not None
        }
        return cls(
            weigher=cfg.scheduler.weigher,
            cpu_overcommit=cfg.scheduler.cpu_overcommit,
            memory_overcommit=cfg.scheduler.memory_overcommit,
            vo_quotas=quotas,
        )


@dataclass(slots=True)
class Snapshot:
    """Hosts (with used resources from their claims) and the live instances, read at one moment.

    Possibly slightly stale: the atomic claim in Redis is what finally prevents overbooking.
    """

    hosts: tuple[Host, ...]
    instances: tuple[Instance, ...]
    taken_at: float = 0.0
    # HostIndex cache, built on first use by the scheduler (arrays are built once per snapshot).
    _index: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    """How one filter treated the hosts that reached it (filters run as a cascade)."""

    name: str
    passed: int
    failed: int
    examples: tuple[tuple[str, str], ...] = ()  # (host, reason) for a few failed hosts

    def __str__(self) -> str:
        text = f"{self.name}: {self.failed} host{'s' if self.failed != 1 else ''} out"
        if self.examples:
            text += " (" + ", ".join(f"{h}: {r}" if h else r for h, r in self.examples) + ")"
        return text


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a request was not placed."""

    instance_id: str
    hosts_total: int
    filters: tuple[FilterOutcome, ...]
    note: str = ""

    def __str__(self) -> str:
        parts = [str(f) for f in self.filters if f.failed]
        head = f"no host for {self.instance_id} among {self.hosts_total} hosts"
        body = "; ".join(parts) if parts else "no hosts known"
        return f"{head}: {body}" + (f"; {self.note}" if self.note else "")


@dataclass(slots=True)
class Plan:
    """The scheduler's decision.  ``order`` is the order requests were considered (start order)."""

    placements: dict[str, str] = field(default_factory=dict)  # instance id -> host
    preemptions: dict[str, str] = field(default_factory=dict)  # victim id -> reason
    victim_hosts: dict[str, str] = field(default_factory=dict)  # victim id -> its host
    unplaced: dict[str, Explanation] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unplaced
