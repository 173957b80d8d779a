"""The demand watcher: one loop that reads the batch system once per cycle, drives every VO's warm pool
(batch_hooks.pools decides, this module does) and reclaims leaked worker VMs (batch_hooks.reclaim decides).

Each cycle: (1) one JobSource.read(); (2) one pipelined read of every live worker VM; (3) per VO: its pool
view (settings, idle and booting pool VMs, limits headroom, the image's breaker) -> plan -> start pool VMs
(submit, tier pool) and retire+release idle ones; (4) reclaim verdicts -> release.  The loop survives any
exception; its last run is the Redis hash ``<prefix>:pool:watcher`` (``dynvm pool list`` shows it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batch_hooks.demand import Demand, JobSource, VOResolver, count
from batch_hooks.pools import PoolPlan, PoolSettings, PoolView, plan_pool
from batch_hooks.poolstate import PoolState, pool_view_parts
from batch_hooks.reclaim import Action, WorkerVM, judge_all
from provisioner.breaker import BState, CircuitOpenError, store_of
from provisioner.errors import DynvmError
from provisioner.model import Instance, InstanceState, Role, Tier
from provisioner.runtime import Runtime

if TYPE_CHECKING:
    from provisioner.catalogue.model import ResolvedImage

log = logging.getLogger("dynvm.pools")
LIVE = frozenset({InstanceState.REQUESTED, InstanceState.PLACED, InstanceState.BOOTING, InstanceState.READY})


def status_key(prefix: str) -> str:
    return f"{prefix}:pool:watcher"


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


def drive_pools(rt: Runtime, ps: PoolState, demand: Demand, workers: list[Instance], now: float,
                rep: CycleReport) -> None:
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
                  batch: str) -> None:
    from provisioner.control.client import release

    cluster = rt.config.pools.cluster
    if cluster is None:
        return
    if demand.jobs is None:
        rep.notes.append(f"reclaim skipped: batch output not fully understood ({demand.problem})")
        return
    vms = [WorkerVM(w.id, w.owner, w.created) for w in workers if w.owner is not None and w.state in LIVE]
    for v in judge_all(vms, demand.jobs, batch, cluster, now, rt.config.pools.reclaim_grace_s):
        if v.action is Action.RECLAIM:
            release(rt, v.vm)
            rt.store.add_event("reclaimed", v.why, instance=v.vm)
            rep.reclaimed.append(v.vm)


def cycle(rt: Runtime, source: JobSource) -> CycleReport:
    """One demand + pools + reclaim cycle (raises on a failed batch read: nothing is decided on it)."""
    rep = CycleReport()
    t0 = time.monotonic()
    reading = source.read()
    rep.read_ms = (time.monotonic() - t0) * 1000
    demand = count(reading, VOResolver(rt.config))
    rep.pending, rep.rejected, rep.unmapped = demand.pending, demand.rejected, demand.unmapped
    now = rt.store.redis_time()
    workers = rt.store.list_instances(role=Role.WORKER)
    drive_pools(rt, pool_state(rt), demand, workers, now, rep)
    reclaim_leaks(rt, demand, workers, now, rep, source.name)
    rep.total_ms = (time.monotonic() - t0) * 1000
    return rep


def record(rt: Runtime, rep: CycleReport | None, error: str = "") -> None:
    """The watcher's last run, for ``dynvm pool list`` / ``dynvm status``."""
    key = status_key(rt.store.keys.prefix)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fields: dict[str, str] = {"last_run": now, "last_error": error[:300]}
    if rep is not None:
        fields.update(last_ok=now, pending=json.dumps(rep.pending), started=json.dumps(rep.started),
                      released=str(len(rep.released)), reclaimed=str(len(rep.reclaimed)),
                      rejected_lines=str(rep.rejected), unmapped=str(rep.unmapped),
                      read_ms=f"{rep.read_ms:.1f}", cycle_ms=f"{rep.total_ms:.1f}",
                      notes=json.dumps(rep.notes[:20]))
    pipe = rt.store.r.pipeline(transaction=True)
    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
    pipe.hincrby(key, "cycles" if rep is not None else "errors", 1)
    pipe.execute()


def run(rt: Runtime, source: JobSource, stop: threading.Event, interval_s: float | None = None) -> None:
    """Cycle until ``stop``; any exception is logged and recorded, and the loop goes on."""
    interval = interval_s if interval_s is not None else rt.config.pools.watch_interval_s
    while not stop.is_set():
        try:
            record(rt, cycle(rt, source))
        except Exception as exc:  # the loop must outlive Redis blips, squeue failures and bugs alike
            log.warning("pool watcher cycle failed: %s", exc)
            try:
                record(rt, None, f"{type(exc).__name__}: {exc}")
            except Exception:
                log.exception("pool watcher: cannot record the failure")
        stop.wait(interval)


def status_summary(rt: Runtime) -> dict[str, str]:
    """For ``dynvm status``: the watcher's last run and the images whose breaker is not closed."""
    from provisioner.breaker import redis_errors

    with redis_errors(rt.config.redis_url):
        raw: dict[str, str] = rt.store.r.hgetall(status_key(rt.store.keys.prefix))  # type: ignore[assignment]
        tripped = {i: b for i, b in store_of(rt).list().items() if b.state is not BState.CLOSED}
    if raw:
        err = f"; last error: {raw['last_error']}" if raw.get("last_error") else ""
        watcher = (f"last run {raw.get('last_run', '-')}, last good {raw.get('last_ok', '-')}, "
                   f"{raw.get('cycles', '0')} cycles, {raw.get('errors', '0')} errors, "
                   f"pending {raw.get('pending', '{}')}{err}")
    else:
        watcher = "never ran (dynvm pool watch)"
    breakers = ", ".join(f"{i} {b.state.value} ({b.failures} failed boots)" for i, b in tripped.items())
    return {"pool_watcher": watcher, "breakers": breakers or "all closed"}
