"""Warm pools, the decision: demand + a VO's pool now -> how many VMs to start, which idle ones to release.

Pure (STYLE 2): no Redis, no clock, no I/O; batch_hooks.poolstate reads the snapshot and applies the plan,
batch_hooks.demand runs the loop around both.

A VO's pool keeps ``want = clamp(pending jobs, min, max)`` VMs warm (ready and idle, or still booting):
each pending job of the VO will take one when it starts.  From zero and back to zero: with ``min = 0`` and
no pending jobs, idle VMs go once they have been idle for ``idle_timeout_s``.  VMs above ``max`` (an
operator lowered it) go at once; a surplus below ``max`` waits for the idle timeout, so a burst of jobs
that drains the queue for a moment does not throw warm VMs away.  Booting VMs are never released here
(they become idle first and time out like any other).  Starts are capped by what the VO's limits still
allow (provisioner.limits) and by the image's circuit breaker (provisioner.breaker).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_POOL = 10_000
MAX_IDLE_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """One VO's pool: keep between ``min`` and ``max`` VMs warm; release idle ones after the timeout."""

    min: int = 0
    max: int = 0
    idle_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        from provisioner.errors import ValidationError

        if not 0 <= self.min <= MAX_POOL or not 0 <= self.max <= MAX_POOL:
            raise ValidationError(f"pool min/max must be in 0..{MAX_POOL} (got {self.min}/{self.max})")
        if self.min > self.max:
            raise ValidationError(f"pool min {self.min} is above max {self.max}")
        if not 0 <= self.idle_timeout_s <= MAX_IDLE_TIMEOUT_S:
            raise ValidationError(f"pool idle timeout must be in 0..{MAX_IDLE_TIMEOUT_S} s")


@dataclass(frozen=True, slots=True)
class IdleVM:
    id: str
    idle_since: float  # Redis clock, seconds


@dataclass(frozen=True, slots=True)
class PoolView:
    """What the watcher saw of one VO's pool at ``now`` (all times from Redis's clock)."""

    vo: str
    settings: PoolSettings
    pending: int  # the VO's pending batch jobs
    idle: tuple[IdleVM, ...] = ()  # ready, owned by no job
    booting: int = 0  # started for the pool, not ready yet
    headroom: int | None = None  # VMs the VO's limits still allow (None: no limit)
    may_boot: int | None = None  # boots the image's circuit breaker allows now (None: closed, no cap)


@dataclass(frozen=True, slots=True)
class PoolPlan:
    vo: str
    want: int
    start: int = 0
    release: tuple[str, ...] = ()
    why: tuple[str, ...] = field(default_factory=tuple)


def target(settings: PoolSettings, pending: int) -> int:
    """How many VMs the pool keeps warm for ``pending`` jobs."""
    return max(settings.min, min(max(pending, 0), settings.max))


def plan_pool(view: PoolView, now: float) -> PoolPlan:
    """Start and release decisions for one VO's pool."""
    s = view.settings
    want = target(s, view.pending)
    have = len(view.idle) + view.booting
    why: list[str] = []
    start = max(0, want - have)
    if start and view.headroom is not None and start > view.headroom:
        why.append(f"limits allow {max(view.headroom, 0)} more of {start}")
        start = max(view.headroom, 0)
    if start and view.may_boot is not None and start > view.may_boot:
        why.append(f"circuit breaker allows {view.may_boot} boot(s)")
        start = view.may_boot
    release: list[str] = []
    if have > want:
        oldest_first = sorted(view.idle, key=lambda v: (v.idle_since, v.id))
        over_max = max(0, have - s.max)  # above max: go now, idle or not long enough
        release = [v.id for v in oldest_first[:over_max]]
        surplus = have - want - len(release)
        expired = [v.id for v in oldest_first[len(release):] if now - v.idle_since >= s.idle_timeout_s]
        release += expired[: max(0, surplus)]
        if release:
            why.append(f"{len(release)} idle above target {want}")
    return PoolPlan(view.vo, want, start, tuple(release), tuple(why))


def plan_all(views: list[PoolView], now: float) -> list[PoolPlan]:
    return [plan_pool(v, now) for v in views]
