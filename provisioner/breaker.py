"""Circuit breaker per image: N consecutive failed boots stop provisioning that image for a back-off.

Decide (pure): ``step(state, event, settings)`` over the transition table below.  Do: ``BreakerStore``
keeps one hash per image in Redis and applies ``step`` with compare-and-set (WATCH the hash, write in
MULTI); a boot attempt's outcome is counted once however often it is delivered (a per-attempt marker key
is checked and written in the same transaction).  Truth: Redis ``<prefix>:breaker:<image ref>``.

    closed     --failure (n-th in a row)--> open (retry after the back-off)
    open       --admit, back-off passed---> half_open (this caller's boot is the one probe)
    half_open  --admit, probe in flight---> refused (until the probe's deadline passes)
    half_open  --success------------------> closed (back-off reset)
    half_open  --failure------------------> open (back-off doubled, up to the maximum)
    open       --success------------------> closed (a boot admitted before it opened proved the image)
    any        --reset (operator)---------> closed

Neutral module: agents (boot outcome) and the requesting side (admission) both call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import redis

from provisioner.errors import DynvmError, TransientError, UnavailableError, ValidationError
from provisioner.state.keys import check_id

if TYPE_CHECKING:
    from provisioner.model import Instance
    from provisioner.runtime import Runtime
    from provisioner.state.store import StateStore

log = logging.getLogger(__name__)
ATTEMPT_MARK_TTL_S = 7 * 24 * 3600
CAS_ATTEMPTS = 200  # optimistic retries under contention (many agents reporting at once)


class CircuitOpenError(TransientError):
    """The image's breaker refuses new boots for now (transient: retry after the back-off)."""

    code = "circuit_open"
    exit_code = 4


class BState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Ev(StrEnum):
    FAILURE = "failure"
    SUCCESS = "success"
    ADMIT = "admit"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failures: int = 3  # consecutive failed boots that open the circuit
    backoff_s: float = 300.0  # first back-off; doubled after each failed probe
    max_backoff_s: float = 3600.0
    probe_timeout_s: float = 300.0  # a half-open probe that reports nothing by then lets another through


@dataclass(frozen=True, slots=True)
class Breaker:
    state: BState = BState.CLOSED
    failures: int = 0  # consecutive failed boots (reset by a success)
    backoff_s: float = 0.0  # the current back-off (0 until the first opening)
    retry_at: float = 0.0  # open: when the next probe may go
    probe_until: float = 0.0  # half_open: until when the admitted probe holds the slot
    opened: int = 0  # how many times it opened (history, for the operator)
    last_reason: str = ""

    def to_fields(self) -> dict[str, str]:
        return {k: str(v.value if isinstance(v, StrEnum) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> Breaker:
        if not raw:
            return cls()
        try:
            return cls(BState(raw.get("state", "closed")), int(raw.get("failures", 0)),
                       float(raw.get("backoff_s", 0)), float(raw.get("retry_at", 0)),
                       float(raw.get("probe_until", 0)), int(raw.get("opened", 0)),
                       raw.get("last_reason", ""))
        except ValueError:
            return cls(last_reason="unreadable record reset")


@dataclass(frozen=True, slots=True)
class Outcome:
    breaker: Breaker
    allowed: bool = True  # ADMIT only: whether the boot may go
    event: str = ""  # an event to record ("breaker_open", "breaker_half_open", "breaker_closed")


def _open(b: Breaker, s: BreakerSettings, now: float, failures: int, reason: str) -> Outcome:
    # A failed probe doubles the back-off; opening from closed starts again from the configured one.
    backoff = s.backoff_s
    if b.state is not BState.CLOSED:
        backoff = min(max(b.backoff_s, s.backoff_s) * 2, s.max_backoff_s)
    nb = Breaker(BState.OPEN, failures, backoff, now + backoff, 0.0, b.opened + 1, reason[:300])
    return Outcome(nb, event="breaker_open")


def step(b: Breaker, ev: Ev, s: BreakerSettings, now: float, reason: str = "") -> Outcome:
    """The breaker after ``ev`` at ``now`` (the transition table of the module docstring)."""
    if ev is Ev.RESET:
        return Outcome(Breaker(opened=b.opened, last_reason="reset by operator"),
                       event="breaker_closed" if b.state is not BState.CLOSED else "")
    if ev is Ev.SUCCESS:
        closed = Breaker(opened=b.opened, last_reason=b.last_reason)
        return Outcome(closed, event="breaker_closed" if b.state is not BState.CLOSED else "")
    if ev is Ev.FAILURE:
        n = b.failures + 1
        if b.state is BState.HALF_OPEN or (b.state is BState.CLOSED and n >= s.failures):
            return _open(b, s, now, n, reason)
        return Outcome(dataclasses.replace(b, failures=n, last_reason=reason[:300] or b.last_reason))
    # ADMIT
    if b.state is BState.CLOSED:
        return Outcome(b)
    if b.state is BState.OPEN and now < b.retry_at:
        return Outcome(b, allowed=False)
    if b.state is BState.HALF_OPEN and now < b.probe_until:
        return Outcome(b, allowed=False)
    probe = dataclasses.replace(b, state=BState.HALF_OPEN, probe_until=now + s.probe_timeout_s)
    return Outcome(probe, event="breaker_half_open" if b.state is BState.OPEN else "")


def refusal(image: str, b: Breaker, now: float) -> str:
    """The one line a refused caller (hook, CLI) shows."""
    if b.state is BState.HALF_OPEN:
        wait = max(0.0, b.probe_until - now)
        return (f"image {image}: circuit half-open after {b.failures} failed boots; one probe boot is "
                f"running, retry after {wait:.0f} s")
    return (f"image {image}: circuit open after {b.failures} failed boots; retry after "
            f"{max(0.0, b.retry_at - now):.0f} s ({b.last_reason[:120] or 'no reason recorded'})")


class BreakerStore:
    """The breakers in Redis; every change is step() applied by compare-and-set."""

    def __init__(self, r: redis.Redis, prefix: str, settings: BreakerSettings) -> None:
        self.r, self.prefix, self.settings = r, check_id(prefix, "key prefix"), settings

    def key(self, image: str) -> str:
        return f"{self.prefix}:breaker:{check_id(image, 'image')}"

    def index(self) -> str:
        return f"{self.prefix}:breakers"

    def _mark(self, image: str, attempt: str) -> str:
        return f"{self.prefix}:breaker-seen:{check_id(image, 'image')}:{check_id(attempt, 'boot attempt')}"

    def now(self) -> float:
        secs, us = self.r.time()
        return float(secs) + float(us) / 1e6

    def get(self, image: str) -> Breaker:
        return Breaker.from_fields(self.r.hgetall(self.key(image)))  # type: ignore[arg-type]

    def list(self) -> dict[str, Breaker]:
        names = sorted(cast(set[str], self.r.smembers(self.index())))
        return {str(n): self.get(str(n)) for n in names}

    def apply(self, image: str, ev: Ev, reason: str = "", attempt: str | None = None) -> Outcome | None:
        """step() by compare-and-set; None if ``attempt`` was already counted (a redelivery)."""
        key = self.key(image)
        mark = self._mark(image, attempt) if attempt is not None else None
        for _ in range(CAS_ATTEMPTS):
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key, *([mark] if mark else []))  # type: ignore[no-untyped-call]
                    if mark is not None and pipe.exists(mark):
                        return None
                    raw = pipe.hgetall(key)
                    before = Breaker.from_fields(raw)  # type: ignore[arg-type]
                    out = step(before, ev, self.settings, self.now(), reason)
                    changed = out.breaker != before or not raw
                    if not changed and mark is None:
                        pipe.unwatch()
                        return out
                    pipe.multi()
                    if changed:
                        pipe.hset(key, mapping=cast(dict[Any, Any], out.breaker.to_fields()))
                        pipe.sadd(self.index(), image)
                    if mark is not None:
                        pipe.set(mark, "1", ex=ATTEMPT_MARK_TTL_S)
                    pipe.execute()
                    return out
                except redis.WatchError:
                    time.sleep(random.uniform(0, 0.002))  # de-synchronise the racers
                    continue
        raise TransientError(f"image {image}: breaker kept changing; retry")

    def admit(self, image: str) -> Breaker:
        """Let a boot of ``image`` go, or raise CircuitOpenError with the one-line reason."""
        out = self.apply(image, Ev.ADMIT)
        assert out is not None
        if not out.allowed:
            raise CircuitOpenError(refusal(image, out.breaker, self.now()))
        return out.breaker


@contextlib.contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """Code that talks to Redis directly (breakers, pools, limits): a lost or read-only Redis is one
    UnavailableError line naming the redacted URL, never a redis-py traceback."""
    from provisioner.redisurl import redact

    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UnavailableError(f"redis at {redact(url)} unavailable: {detail}") from None


def settings_of(rt: Runtime) -> BreakerSettings:
    cfg = getattr(rt.config, "breaker", None)
    if cfg is None:
        return BreakerSettings()
    return BreakerSettings(cfg.failures, cfg.backoff_s, cfg.max_backoff_s, rt.config.timeouts.provision_s)


def store_of(rt: Runtime) -> BreakerStore:
    return BreakerStore(rt.store.r, rt.store.keys.prefix, settings_of(rt))


def _event(store: StateStore, image: str, out: Outcome, host: str | None, iid: str | None) -> None:
    if not out.event:
        return
    b = out.breaker
    detail = {"breaker_open": f"after {b.failures} failed boots; retry in {b.backoff_s:.0f} s: "
              f"{b.last_reason[:200]}", "breaker_half_open": "one probe boot let through",
              "breaker_closed": "boots allowed again"}[out.event]
    store.add_event(out.event, f"image {image}: {detail}", instance=iid, host=host)


def breaker_gate(rt: Runtime, image: str) -> str | None:
    """The key create_instance checks for a closed breaker in its own script (None: no breaker can exist
    for a ref outside the key alphabet; refs are validated elsewhere)."""
    try:
        return store_of(rt).key(image)
    except ValidationError:
        return None


def check_admission(rt: Runtime, image: str) -> None:
    """Raise CircuitOpenError (with an event) if ``image``'s breaker refuses a new boot now."""
    bs = store_of(rt)
    with redis_errors(rt.config.redis_url):
        try:
            raw = cast(dict[str, str], rt.store.r.hgetall(bs.key(image)))
            if Breaker.from_fields(raw).state is BState.CLOSED:
                return  # the common case: one read, no transaction
            out = bs.apply(image, Ev.ADMIT)
        except ValidationError:
            return  # an image ref outside the key alphabet has no breaker (refs are validated elsewhere)
        assert out is not None
        _event(rt.store, image, out, None, None)
        if not out.allowed:
            message = refusal(image, out.breaker, bs.now())
            rt.store.add_event("breaker_refused", message)
            raise CircuitOpenError(message)


def record_boot(rt: Runtime, inst: Instance, ok: bool, reason: str = "") -> None:
    """Count one boot attempt's outcome (once per instance and placement epoch).  Never raises: the
    breaker must not fail the boot path it watches."""
    try:
        bs = store_of(rt)
        if ok:
            # Success is idempotent (closing twice is closing); a closed breaker with no failures stays so.
            b = Breaker.from_fields(cast(dict[str, str], rt.store.r.hgetall(bs.key(inst.image))))
            if b.state is BState.CLOSED and b.failures == 0:
                return
        out = bs.apply(inst.image, Ev.SUCCESS if ok else Ev.FAILURE, reason or inst.reason,
                       attempt=None if ok else f"{inst.id}.{inst.epoch}")
        if out is not None:
            _event(rt.store, inst.image, out, rt.host, inst.id)
    except (DynvmError, redis.RedisError) as err:
        log.warning("breaker of %s: outcome of %s not counted: %s", inst.image, inst.id, err)
    except Exception:  # the breaker must never take a boot down with it
        log.exception("breaker of %s: outcome of %s not counted", inst.image, inst.id)


def reset(rt: Runtime, image: str) -> Breaker:
    with redis_errors(rt.config.redis_url):
        out = store_of(rt).apply(image, Ev.RESET)
    assert out is not None
    with contextlib.suppress(DynvmError):
        _event(rt.store, image, out, None, None)
    return out.breaker

