"""Runtime records: hosts and instances, their states and the instance lifecycle table.

Truth: the records live in Redis (provisioner.state); libvirt is the truth for what *runs*.
These are plain dataclasses so the scheduler and planners stay pure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from provisioner.errors import InvalidTransition


class HostState(StrEnum):
    UP = "up"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"
    SUSPECT = "suspect"
    DEAD = "dead"
    FENCED = "fenced"


# Only these accept new placements.
PLACEABLE_HOST_STATES = frozenset({HostState.UP})
# Hosts whose death the HA monitor acts on: maintenance is disarmed, dead/fenced are already handled.
# A move from outside into these stamps the host's ``watched_since`` (provisioner.state.hosts).
WATCHED_HOST_STATES = frozenset({HostState.UP, HostState.DRAINING, HostState.SUSPECT})

H = HostState
# Moves any writer (agent, monitor, operator) may make, always compare-and-set on the state it read.
# A dead host only goes on to fenced: nothing automatic brings it back, because its VMs may be running
# elsewhere by then; a suspect host is one the agent could not reach libvirt on (it may come back up).
HOST_TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    H.UP: frozenset({H.DRAINING, H.MAINTENANCE, H.SUSPECT, H.DEAD}),
    H.DRAINING: frozenset({H.UP, H.MAINTENANCE, H.SUSPECT, H.DEAD}),
    H.MAINTENANCE: frozenset({H.UP, H.DRAINING, H.SUSPECT, H.DEAD}),
    H.SUSPECT: frozenset({H.UP, H.DRAINING, H.MAINTENANCE, H.DEAD}),
    H.DEAD: frozenset({H.FENCED}),
    H.FENCED: frozenset(),
}
# Moves only an operator may make (``dynvm host rejoin``, undrain): leaving dead/fenced after checking
# the host by hand.  Operators may also make every move of HOST_TRANSITIONS.
OPERATOR_HOST_TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    H.DEAD: frozenset({H.UP, H.DRAINING, H.MAINTENANCE}),
    H.FENCED: frozenset({H.UP, H.DRAINING, H.MAINTENANCE}),
}


def host_transition_allowed(current: HostState, new: HostState, operator: bool = False) -> bool:
    """Whether ``current -> new`` is allowed (the same state is a no-op, always allowed)."""
    if current == new or new in HOST_TRANSITIONS[current]:
        return True
    return operator and new in OPERATOR_HOST_TRANSITIONS.get(current, frozenset())


class Role(StrEnum):
    WORKER = "worker"
    SERVICE = "service"


class Tier(StrEnum):
    """Priority tiers, highest first.  Lower tiers may be preempted by higher ones."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    WORKER = "worker"  # a running worker VM owned by a job
    POOL = "pool"  # an idle warm-pool worker

    @property
    def rank(self) -> int:
        return _TIER_RANK[self]


_TIER_RANK = {Tier.CRITICAL: 4, Tier.HIGH: 3, Tier.NORMAL: 2, Tier.WORKER: 1, Tier.POOL: 0}


class InstanceState(StrEnum):
    REQUESTED = "requested"
    PLACED = "placed"
    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    MIGRATING = "migrating"
    STOPPING = "stopping"
    GONE = "gone"
    FAILED = "failed"
    LOST = "lost"


S = InstanceState
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.REQUESTED: frozenset({S.PLACED, S.FAILED, S.STOPPING, S.GONE}),
    S.PLACED: frozenset({S.BOOTING, S.FAILED, S.STOPPING, S.LOST, S.REQUESTED}),
    S.BOOTING: frozenset({S.READY, S.FAILED, S.STOPPING, S.LOST}),
    S.READY: frozenset({S.DRAINING, S.MIGRATING, S.STOPPING, S.FAILED, S.LOST}),
    S.DRAINING: frozenset({S.STOPPING, S.MIGRATING, S.READY, S.FAILED, S.LOST}),
    S.MIGRATING: frozenset({S.READY, S.FAILED, S.LOST, S.STOPPING}),
    S.STOPPING: frozenset({S.GONE, S.FAILED, S.LOST}),
    S.GONE: frozenset(),
    S.FAILED: frozenset({S.STOPPING, S.GONE, S.REQUESTED}),
    S.LOST: frozenset({S.STOPPING, S.GONE, S.REQUESTED}),
}
TERMINAL_STATES = frozenset({S.GONE})
# States in which an instance holds a capacity claim on its host.
CLAIMING_STATES = frozenset({S.PLACED, S.BOOTING, S.READY, S.DRAINING, S.MIGRATING, S.STOPPING})


def check_transition(current: InstanceState, new: InstanceState) -> None:
    """Raise InvalidTransition unless ``current -> new`` is in the table (same state is a no-op)."""
    if current == new:
        return
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"instance cannot go from {current.value} to {new.value}")


@dataclass(frozen=True, slots=True)
class Capacity:
    vcpus: int
    memory_mib: int
    disk_gib: int = 0

    def fits(self, vcpus: int, memory_mib: int) -> bool:
        return vcpus <= self.vcpus and memory_mib <= self.memory_mib


@dataclass(slots=True)
class Host:
    name: str
    uri: str
    state: HostState = HostState.UP
    capacity: Capacity = field(default_factory=lambda: Capacity(0, 0))
    used_vcpus: int = 0
    used_memory_mib: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    detection_class: str = "standard"
    last_seen: float = 0.0  # epoch seconds (Redis clock) of the last lease renewal
    epoch: int = 0  # bumped each time the agent (re)registers
    # Whether an agent holds the host's lease, as read with the record (a snapshot reads it; None: not read).
    lease_alive: bool | None = None
    # Epoch seconds (Redis clock) of its last move into WATCHED_HOST_STATES from outside (an operator's
    # rejoin, the end of a maintenance); 0.0 if it never left watch.  HA counts silence from the later of
    # it and last_seen (ha.detection.heard_at).
    watched_since: float = 0.0

    @property
    def free_vcpus(self) -> int:
        return self.capacity.vcpus - self.used_vcpus

    @property
    def free_memory_mib(self) -> int:
        return self.capacity.memory_mib - self.used_memory_mib

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        return d


@dataclass(slots=True)
class Instance:
    id: str
    role: Role
    image: str  # resolved "name:version"
    vcpus: int
    memory_mib: int
    state: InstanceState = InstanceState.REQUESTED
    tier: Tier = Tier.WORKER
    vo: str | None = None
    host: str | None = None
    owner: str | None = None  # batch job key ("slurm:1234") or service name
    idempotency_key: str | None = None
    service: str | None = None  # declared service name, for role=service
    mac: str | None = None
    ip: str | None = None
    anti_affinity: str | None = None
    reason: str = ""
    created: float = 0.0
    updated: float = 0.0
    attempts: int = 0
    # Placement epoch: bumped (inside Redis, atomically) on every placement and migration, so a decision
    # taken on an older read of this record (state, host, epoch) can be refused by compare-and-set.
    epoch: int = 0

    @property
    def domain_name(self) -> str:
        return f"dynvm-{self.id}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["role"] = self.role.value
        d["state"] = self.state.value
        d["tier"] = self.tier.value
        return d
