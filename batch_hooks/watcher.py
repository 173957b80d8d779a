"""The demand watcher: one loop that reads the batch system once per cycle, drives every VO's warm pool
(batch_hooks.pools decides, this module does) and reclaims leaked worker VMs (batch_hooks.reclaim decides).

Each cycle: (1) one JobSource.read(); (2) one pipelined read of every live worker VM; (3) per VO: its pool
view (settings, idle and booting pool VMs, limits headroom, the image's breaker) -> plan -> start pool VMs
(submit, tier pool) and retire+release idle ones; (4) reclaim verdicts -> release.  The loop survives any
exception; its last run is the Redis hash ``<prefix>:pool:watcher`` (``dynvm status`` and ``dynvm pool list``
show it, STALLED when the last run is older than a few cycles).

A daemon: every control worker runs ``serve`` when ``pools.batch`` is set, and exactly one of them runs
cycles at a time.  It holds a Redis lease (``<prefix>:poolwatch:lease`` = ``member|random``, taken by
``SET NX PX``, renewed and released by compare-and-set in Lua) that a keeper thread renews every third of
its period; the others wait for it to expire, so a dead holder is replaced within one lease period.  The
holder re-checks the lease (a synchronous renew) before each VO and before reclaim, and its record of the
cycle is written only while the lease holds its token: a holder that stalled past its lease and wakes
stops at its next check, and whatever it writes after losing the lease is refused.  A batch read is cut off
at ``pools.read_timeout_s`` (batch_hooks.demand): that cycle records an error naming the source and decides
nothing, so the pools keep what they have.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from batch_hooks.demand import Demand, JobSource, VOResolver, count
from batch_hooks.pools import PoolPlan, PoolSettings, PoolView, plan_pool
from batch_hooks.poolstate import PoolState, pool_view_parts
from batch_hooks.reclaim import Action, WorkerVM, judge_all
from provisioner.breaker import BState, CircuitOpenError, store_of
from provisioner.errors import ConflictError, DynvmError, TransientError
from provisioner.model import Instance, InstanceState, Role, Tier
from provisioner.runtime import Runtime

if TYPE_CHECKING:
    from provisioner.catalogue.model import ResolvedImage

log = logging.getLogger("dynvm.pools")
LIVE = frozenset({InstanceState.REQUESTED, InstanceState.PLACED, InstanceState.BOOTING, InstanceState.READY})


def status_key(prefix: str) -> str:
    return f"{prefix}:pool:watcher"


def lease_key(prefix: str) -> str:
    return f"{prefix}:poolwatch:lease"


STALL_CYCLES = 3  # STALLED: no run for this many intervals beyond the lease (a takeover's gap)

_RENEW = """
-- KEYS[1] lease; ARGV: token, ttl_ms.  Extends the lease only while it holds this token.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
-- KEYS[1] lease; ARGV: token.  Drops the lease only while it holds this token.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RECORD = """
-- KEYS[1] status hash, KEYS[2] lease; ARGV: token ('' = not leased: a one-off `pool watch --once`),
-- the counter to increment, then field, value pairs.  Written only while the lease holds this token.
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
return 1
"""


class WatcherLease:
    """The one-watcher-per-farm lease: ``member|random`` with a PX expiry on Redis's clock."""

    def __init__(self, r: Any, prefix: str, member: str, ttl_s: float) -> None:
        from provisioner.ids import check_id

        if not ttl_s > 0:
            raise ValueError(f"watcher lease {ttl_s} must be > 0")
        self.r = r
        self.member = check_id(member, "watcher member id")
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.key = lease_key(prefix)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)

    def take(self) -> str | None:
        """The lease's new token if it was free (SET NX PX), else None."""
        token = f"{self.member}|{secrets.token_hex(8)}"
        return token if self.r.set(self.key, token, nx=True, px=self.ttl_ms) else None

    def renew(self, token: str) -> bool:
        return bool(self._renew(keys=[self.key], args=[token, self.ttl_ms]))

    def release(self, token: str) -> bool:
        return bool(self._release(keys=[self.key], args=[token]))

    def holder(self) -> tuple[str, float] | None:
        """(member, seconds left) of whoever holds the lease now, or None."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.key)
        pipe.pttl(self.key)
        value, pttl = pipe.execute()
        if value is None:
            return None
        return str(value).partition("|")[0], max(0, int(pttl)) / 1000


class Holding:
    """This process's hold on the lease: taken when free, renewed by a keeper thread every third of the
    lease, checked synchronously by the cycle (``still_mine``)."""

    def __init__(self, lease: WatcherLease, stop: threading.Event) -> None:
        self.lease = lease
        self.stop = stop
        self.token: str | None = None
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            if self.token is None:
                self.token = self.lease.take()
            return self.token is not None

    def still_mine(self) -> bool:
        with self._lock:
            if self.token is not None and not self.lease.renew(self.token):
                log.warning("pool watcher: %s lost the lease", self.lease.member)
                self.token = None
            return self.token is not None

    def lost(self) -> None:
        with self._lock:
            self.token = None

    def keep(self) -> None:
        """The keeper thread's loop: renew while held (a failed renewal is a lost lease)."""
        while not self.stop.wait(self.lease.ttl_ms / 3000):
            try:
                self.still_mine()
            except Exception as exc:  # Redis away: the lease runs out on its own, the next check sees it
                log.warning("pool watcher: cannot renew the lease: %s", exc)

    def drop(self) -> None:
        with self._lock:
            token, self.token = self.token, None
        if token is not None:
            try:
                self.lease.release(token)
            except Exception as exc:
                log.warning("pool watcher: cannot release the lease (it expires): %s", exc)


def pool_state(rt: Runtime) -> PoolState:
    p = rt.config.pools
    return PoolState(rt.store.r, rt.store.keys.prefix, PoolSettings(p.min, p.max, p.idle_timeout_s))


@dataclass
class CycleReport:
    pending: dict[str, int] = field(default_factory=dict)
    started: dict[str, int] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    reclaimed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    read_ms: float = 0.0
    total_ms: float = 0.0
    rejected: int = 0
    unmapped: int = 0


def _may_boot(rt: Runtime, image: str, now: float) -> int | None:
    b = store_of(rt).get(image)
    if b.state is BState.CLOSED:
        return None
    waiting = now < (b.retry_at if b.state is BState.OPEN else b.probe_until)
    return 0 if waiting else 1


def _view(rt: Runtime, ps: PoolState, vo: str, pending: int, members: list[Instance], image: str,
          vcpus: int, now: float) -> PoolView:
    from provisioner.limits import headroom, limits_of, usage_of

    settings, _ = ps.settings(vo)
    idle, booting = pool_view_parts([m for m in members if m.image == image])
    room = headroom(limits_of(rt, vo), usage_of(rt, vo), vcpus)
    return PoolView(vo, settings, pending, idle, booting, room, _may_boot(rt, image, now))


def _apply(rt: Runtime, ps: PoolState, plan: PoolPlan, image: ResolvedImage, stale: list[str],
           rep: CycleReport) -> None:
    from provisioner.control.client import release, submit

    for iid in [*stale, *plan.release]:
        why = "image no longer the VO's" if iid in stale else "idle above the pool's target"
        if ps.retire(plan.vo, iid, f"pool: {why}"):  # a job taking it first wins; then it is not ours
            release(rt, iid)
            rt.store.add_event("pool_release", f"{why} (target {plan.want})", instance=iid, vo=plan.vo)
            rep.released.append(iid)
    for _ in range(plan.start):
        try:
            inst, _ = submit(rt, image, plan.vo, tier=Tier.POOL)
        except CircuitOpenError as err:
            rep.notes.append(str(err))
            break
        ps.add_member(plan.vo, inst.id)
        rep.started[plan.vo] = rep.started.get(plan.vo, 0) + 1
    if plan.start:
        rt.store.add_event("pool_start", f"{plan.start} VM(s) for target {plan.want}", vo=plan.vo)


Guard = Callable[[], bool]


class ReadFailed(TransientError):
    """A cycle's batch read failed or was cut off: the cycle decided nothing (every pool keeps its VMs)."""

    def __init__(self, source: str, err: Exception) -> None:
        super().__init__(f"{source} read failed: {type(err).__name__}: {err}"[:300])
        self.source = source
        self.exit_code = getattr(err, "exit_code", self.exit_code)  # a cut-off read stays a timeout (6)


def _check(guard: Guard | None) -> None:
    if guard is not None and not guard():
        raise ConflictError("pool watcher: the lease went to another worker mid-cycle; stopped")


def drive_pools(rt: Runtime, ps: PoolState, demand: Demand, workers: list[Instance], now: float,
                rep: CycleReport, guard: Guard | None = None) -> None:
    from provisioner.identity import image_for_vo
    from provisioner.runtime import current_catalogue

    pool_vms: dict[str, list[Instance]] = {}
    for w in workers:
        if w.tier is Tier.POOL and w.owner is None and w.vo is not None and w.state in LIVE:
            pool_vms.setdefault(w.vo, []).append(w)
    known = set(ps.vos())
    for vo in sorted(rt.config.vos):
        members = pool_vms.get(vo, [])
        if vo not in known and rt.config.pools.max == 0 and not members:
            continue  # no pool for this VO and nothing left of one
        _check(guard)  # still the farm's watcher (a stalled holder that lost its lease stops here)
        for m in members:
            ps.add_member(vo, m.id)  # adopt a VM whose watcher died between submit and add_member
        try:
            image = image_for_vo(vo, current_catalogue(rt), rt.config)
            view = _view(rt, ps, vo, demand.pending.get(vo, 0), members, image.ref,
                         image.spec.vcpus.default, now)
            stale = [m.id for m in members if m.image != image.ref and m.state is InstanceState.READY]
            plan = plan_pool(view, now)
            rep.notes.extend(f"{vo}: {w}" for w in plan.why)
            _apply(rt, ps, plan, image, stale, rep)
        except DynvmError as err:  # one VO's problem (its image unknown...) never stops the others
            rep.notes.append(f"{vo}: {err}"[:300])


def reclaim_leaks(rt: Runtime, demand: Demand, workers: list[Instance], now: float, rep: CycleReport,
                  batch: str, guard: Guard | None = None) -> None:
    from provisioner.control.client import release

    cluster = rt.config.pools.cluster
    if cluster is None:
        return
    if demand.jobs is None:
        rep.notes.append(f"reclaim skipped: batch output not fully understood ({demand.problem})")
        return
    _check(guard)
    vms = [WorkerVM(w.id, w.owner, w.created) for w in workers if w.owner is not None and w.state in LIVE]
    for v in judge_all(vms, demand.jobs, batch, cluster, now, rt.config.pools.reclaim_grace_s):
        if v.action is Action.RECLAIM:
            release(rt, v.vm)
            rt.store.add_event("reclaimed", v.why, instance=v.vm)
            rep.reclaimed.append(v.vm)


def cycle(rt: Runtime, source: JobSource, guard: Guard | None = None) -> CycleReport:
    """One demand + pools + reclaim cycle (raises on a failed or cut-off batch read: nothing is decided on
    it, every pool keeps what it has).  ``guard``: False when this process is no longer the watcher."""
    rep = CycleReport()
    t0 = time.monotonic()
    try:
        reading = source.read()
    except Exception as err:
        raise ReadFailed(source.name, err) from None
    rep.read_ms = (time.monotonic() - t0) * 1000
    demand = count(reading, VOResolver(rt.config))
    rep.pending, rep.rejected, rep.unmapped = demand.pending, demand.rejected, demand.unmapped
    now = rt.store.redis_time()
    workers = rt.store.list_instances(role=Role.WORKER)
    drive_pools(rt, pool_state(rt), demand, workers, now, rep, guard)
    reclaim_leaks(rt, demand, workers, now, rep, source.name, guard)
    rep.total_ms = (time.monotonic() - t0) * 1000
    return rep


def record(rt: Runtime, rep: CycleReport | None, error: str = "", holder: str = "",
           token: str = "") -> bool:
    """The watcher's last run, for ``dynvm pool list`` / ``dynvm status``; with ``token`` written only while
    the lease holds it (False: refused, the lease is someone else's)."""
    prefix = rt.store.keys.prefix
    now = rt.store.redis_time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    p = rt.config.pools
    fields: dict[str, str] = {"last_run": stamp, "last_run_ts": f"{now:.3f}", "last_error": error[:300],
                              "holder": holder or "-", "interval_s": f"{p.watch_interval_s:g}",
                              "lease_s": f"{p.watcher_lease_s:g}"}
    if rep is not None:
        fields.update(last_ok=stamp, last_ok_ts=f"{now:.3f}", pending=json.dumps(rep.pending),
                      started=json.dumps(rep.started), released=str(len(rep.released)),
                      reclaimed=str(len(rep.reclaimed)), rejected_lines=str(rep.rejected),
                      unmapped=str(rep.unmapped), read_ms=f"{rep.read_ms:.1f}",
                      cycle_ms=f"{rep.total_ms:.1f}", notes=json.dumps(rep.notes[:20]))
    args = [token, "cycles" if rep is not None else "errors"]
    for k, v in fields.items():
        args += [k, v]
    script = rt.store.r.register_script(_RECORD)
    return bool(script(keys=[status_key(prefix), lease_key(prefix)], args=args))


def one_cycle(rt: Runtime, source: JobSource, holder: str = "", holding: Holding | None = None) -> bool:
    """One cycle and its record, any exception caught and recorded; False when the lease was lost."""
    token = (holding.token or "") if holding is not None else ""
    guard = holding.still_mine if holding is not None else None
    try:
        rep = cycle(rt, source, guard)
        ok = record(rt, rep, holder=holder, token=token)
    except Exception as exc:  # the loop must outlive Redis blips, squeue failures and bugs alike
        log.warning("pool watcher cycle failed: %s", exc)
        try:
            ok = record(rt, None, f"{type(exc).__name__}: {exc}", holder=holder, token=token)
        except Exception:
            log.exception("pool watcher: cannot record the failure")
            return True  # Redis away: the keeper's renewals tell whether the lease is still ours
    if not ok and holding is not None:
        holding.lost()
    return ok


def serve(rt: Runtime, source: JobSource, member: str, stop: threading.Event,
          interval_s: float | None = None, lease_s: float | None = None) -> None:
    """The watcher daemon of one process: stand by until the farm's watcher lease is free, then run cycles
    every ``interval_s`` while holding it; release it when ``stop`` is set.  Survives any exception."""
    p = rt.config.pools
    interval = interval_s if interval_s is not None else p.watch_interval_s
    lease = WatcherLease(rt.store.r, rt.store.keys.prefix, member, lease_s or p.watcher_lease_s)
    holding = Holding(lease, stop)
    keeper = threading.Thread(target=holding.keep, name="pool-watcher-lease", daemon=True)
    keeper.start()
    try:
        while not stop.is_set():
            wait = interval
            try:
                if holding.token is None and holding.try_take():
                    log.info("pool watcher: %s took the lease", member)
                    rt.store.add_event("pool_watcher", f"{member} runs the pool watcher")
                if holding.token is not None:
                    one_cycle(rt, source, member, holding)
                else:
                    now = lease.holder()  # stand by: look again when the holder's lease would run out
                    wait = min(interval, now[1] + 0.01) if now is not None else 0.01
            except Exception as exc:  # Redis down while standing by or taking: try again later
                log.warning("pool watcher (%s): %s", member, exc)
            stop.wait(max(wait, 0.01))
    finally:
        holding.drop()
        keeper.join(timeout=5)


def run(rt: Runtime, source: JobSource, stop: threading.Event, interval_s: float | None = None) -> None:
    """``serve`` as this process (``dynvm pool watch``): it competes for the lease like the workers do."""
    import os
    import re

    serve(rt, source, re.sub(r"[^A-Za-z0-9_.-]", "-", f"watch-{os.getpid()}.{os.uname().nodename}")[:128],
          stop, interval_s)


def describe(raw: dict[str, str], now: float, holder: str | None, interval_s: float, lease_s: float) -> str:
    """One line about the watcher's last run (pure): STALLED when no run for STALL_CYCLES intervals
    beyond the lease (longer than a takeover takes)."""
    if not raw:
        return "never ran" + (f" (lease held by {holder})" if holder else "")
    interval = float(raw.get("interval_s") or interval_s)
    lease = float(raw.get("lease_s") or lease_s)
    age = now - float(raw.get("last_run_ts") or 0)
    stalled = age > STALL_CYCLES * interval + lease
    head = f"STALLED: no run for {age:.0f} s (interval {interval:g} s); " if stalled else ""
    who = f"held by {holder}" if holder else "no holder"
    err = f"; last error: {raw['last_error']}" if raw.get("last_error") else ""
    return (f"{head}last run {raw.get('last_run', '-')} by {raw.get('holder', '-')} ({who}), "
            f"last good {raw.get('last_ok', '-')}, {raw.get('cycles', '0')} cycles, "
            f"{raw.get('errors', '0')} errors, pending {raw.get('pending', '{}')}{err}")


def watcher_line(rt: Runtime) -> str:
    p = rt.config.pools
    raw = cast(dict[str, str], rt.store.r.hgetall(status_key(rt.store.keys.prefix)))
    lease = rt.store.r.get(lease_key(rt.store.keys.prefix))
    holder = str(lease).partition("|")[0] if lease is not None else None
    line = describe(raw, rt.store.redis_time(), holder, p.watch_interval_s, p.watcher_lease_s)
    if p.batch == "none" or not p.watcher:
        why = "pools.batch: none" if p.batch == "none" else "pools.watcher: false"
        return f"not run by the workers ({why}); " + (line if raw else "never ran")
    return line


def status_summary(rt: Runtime) -> dict[str, str]:
    """For ``dynvm status``: the watcher's and the lost-VM requeue's last runs, and the images whose
    breaker is not closed."""
    from batch_hooks.requeue import requeue_line
    from provisioner.breaker import redis_errors

    with redis_errors(rt.config.redis_url):
        watcher = watcher_line(rt)
        requeue = requeue_line(rt)
        tripped = {i: b for i, b in store_of(rt).list().items() if b.state is not BState.CLOSED}
    breakers = ", ".join(f"{i} {b.state.value} ({b.failures} failed boots)" for i, b in tripped.items())
    return {"pool_watcher": watcher, "lost_vm_requeue": requeue, "breakers": breakers or "all closed"}
