"""``dynvm pool``: warm pools per VO (list, show, set) and the demand watcher (watch).

The control workers run the watcher themselves when ``pools.batch`` is set (one at a time, by lease);
``pool watch`` competes for the same lease (it stands by while a worker holds it), ``pool watch --once``
runs one cycle only if no one holds it (exit 4 otherwise).  ``list`` and ``show`` say who holds it and
when it last ran, STALLED when that is a few cycles ago.

Settings live in Redis (``<prefix>:pool:<vo>``); ``set`` changes only the options given, by compare-and-set
on the revision it read, so two operators' edits never silently overwrite each other (exit 4 on a race).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from provisioner.cli.argtypes import int_range, seconds
from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK, UnknownVOError

MAX_POOL = 10_000


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("pool", help="warm pools per VO",
                              description="Warm pools and the demand watcher.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ls = sub.add_parser("list", help="every VO's pool: settings, warm/booting VMs, pending jobs")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="one VO's pool, its VMs and the watcher's last run")
    show.add_argument("vo", metavar="VO")
    show.set_defaults(func=cmd_show)

    st = sub.add_parser("set", help="change a VO's pool (only the options given)")
    st.add_argument("vo", metavar="VO")
    st.add_argument("--min", type=int_range(0, MAX_POOL), help="VMs kept warm without demand")
    st.add_argument("--max", type=int_range(0, MAX_POOL), help="most VMs kept warm (0: no pool)")
    st.add_argument("--idle-timeout", type=seconds(0, 7 * 86400, allow_lo=True), metavar="SECONDS",
                    help="an idle VM above the target goes after this long")
    st.set_defaults(func=cmd_set)

    w = sub.add_parser("watch", help="run the demand watcher (pools + leak reclaim) until interrupted")
    w.add_argument("--once", action="store_true", help="one cycle, print what it did")
    w.add_argument("--interval", type=seconds(0, 3600), metavar="SECONDS",
                   help="default: pools.watch_interval_s")
    w.set_defaults(func=cmd_watch)


def _vo(ctx: CliContext, vo: str) -> str:
    if vo not in ctx.config.vos:
        known = ", ".join(sorted(ctx.config.vos)) or "none"
        raise UnknownVOError(f"unknown VO {vo[:40]!r} (configured: {known})")
    return vo


def _rows(ctx: CliContext) -> list[dict[str, Any]]:
    from batch_hooks.poolstate import pool_view_parts
    from batch_hooks.watcher import pool_state, status_key
    from provisioner.cli.common import runtime
    from provisioner.model import Role, Tier

    rt = runtime(ctx)
    ps = pool_state(rt)
    pending = json.loads(str(rt.store.r.hget(status_key(rt.store.keys.prefix), "pending") or "{}"))
    workers = rt.store.list_instances(role=Role.WORKER)
    rows = []
    for vo in sorted(ctx.config.vos):
        settings, rev = ps.settings(vo)
        mine = [w for w in workers if w.vo == vo and w.tier is Tier.POOL and w.owner is None]
        idle, booting = pool_view_parts(mine)
        rows.append({"vo": vo, "min": settings.min, "max": settings.max,
                     "idle_timeout_s": settings.idle_timeout_s, "warm": len(idle), "booting": booting,
                     "pending": int(pending.get(vo, 0)), "revision": rev, "set": rev > 0})
    return rows


def _watcher(ctx: CliContext) -> dict[str, Any]:
    """The watcher's last-run hash, plus who holds the lease and the one-line summary (STALLED...)."""
    from batch_hooks.watcher import lease_key, status_key, watcher_line
    from provisioner.cli.common import runtime

    rt = runtime(ctx)
    raw: dict[str, str] = rt.store.r.hgetall(status_key(rt.store.keys.prefix))  # type: ignore[assignment]
    lease = rt.store.r.get(lease_key(rt.store.keys.prefix))
    return {**raw, "lease_holder": str(lease).partition("|")[0] if lease is not None else None,
            "summary": watcher_line(rt)}


def _cmd_list(ctx: CliContext, args: argparse.Namespace) -> int:
    rows = _rows(ctx)
    ctx.out.table(rows, ["vo", "min", "max", "idle_timeout_s", "warm", "booting", "pending"], title="pools")
    if ctx.out.mode == "table":
        ctx.out.warning(f"watcher: {_watcher(ctx)['summary']}")
    return EXIT_OK


def _cmd_show(ctx: CliContext, args: argparse.Namespace) -> int:
    vo = _vo(ctx, args.vo)
    row = next(r for r in _rows(ctx) if r["vo"] == vo)
    ctx.out.obj({**row, "watcher": _watcher(ctx)}, title=f"pool {vo}")
    return EXIT_OK


def _cmd_set(ctx: CliContext, args: argparse.Namespace) -> int:
    from batch_hooks.pools import PoolSettings
    from batch_hooks.watcher import pool_state
    from provisioner.cli.common import runtime

    vo = _vo(ctx, args.vo)
    rt = runtime(ctx)
    ps = pool_state(rt)
    cur, rev = ps.settings(vo)
    new = PoolSettings(
        cur.min if args.min is None else args.min,
        cur.max if args.max is None else args.max,
        cur.idle_timeout_s if args.idle_timeout is None else args.idle_timeout,
    )
    if args.max is not None and args.min is None and new.min > new.max:
        new = PoolSettings(new.max, new.max, new.idle_timeout_s)  # lowering max below min lowers min too
    rev = ps.set_settings(vo, new, expected_rev=rev)
    rt.store.add_event("pool_set", f"min={new.min} max={new.max} idle_timeout={new.idle_timeout_s:g}s", vo=vo)
    ctx.out.obj({"vo": vo, "min": new.min, "max": new.max, "idle_timeout_s": new.idle_timeout_s,
                 "revision": rev}, title=f"pool {vo}")
    return EXIT_OK


def _cmd_watch(ctx: CliContext, args: argparse.Namespace) -> int:
    import signal
    import threading

    from batch_hooks.demand import source_for
    from batch_hooks.watcher import WatcherLease, cycle, record, run
    from provisioner.cli.common import runtime
    from provisioner.errors import ConfigError, ConflictError

    rt = runtime(ctx)
    source = source_for(rt.config)
    if source is None:
        raise ConfigError(f"pools.batch is 'none' in {rt.config.source}: set it to slurm or htcondor")
    if args.once:
        import os

        # One cycle under the lease, so it never runs beside a worker's watcher.
        lease = WatcherLease(rt.store.r, rt.store.keys.prefix, f"watch-once-{os.getpid()}",
                             rt.config.pools.watcher_lease_s)
        token = lease.take()
        if token is None:
            held = lease.holder()
            raise ConflictError(f"the pool watcher runs in {held[0] if held else 'another process'} "
                                "(it holds the watcher lease): see `dynvm status`")
        try:
            rep = cycle(rt, source, lambda: lease.renew(token))
            record(rt, rep, holder=lease.member, token=token)
        finally:
            lease.release(token)
        ctx.out.obj({"pending": rep.pending, "started": rep.started, "released": rep.released,
                     "reclaimed": rep.reclaimed, "rejected_lines": rep.rejected, "unmapped": rep.unmapped,
                     "read_ms": round(rep.read_ms, 1), "cycle_ms": round(rep.total_ms, 1),
                     "notes": rep.notes}, title="pool watch")
        return EXIT_OK
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(rt, source, stop, args.interval)
    return EXIT_OK


def _guarded(impl: Any) -> Any:
    """A handler whose direct Redis reads (pool settings, the watcher's hash) fail as one line (exit 5)."""

    def handler(ctx: CliContext, args: argparse.Namespace) -> int:
        from provisioner.breaker import redis_errors

        with redis_errors(ctx.config.redis_url):
            return int(impl(ctx, args))

    return handler


cmd_list = _guarded(_cmd_list)
cmd_show = _guarded(_cmd_show)
cmd_set = _guarded(_cmd_set)
cmd_watch = _guarded(_cmd_watch)

