"""``dynvm service``: declared services (what must run).  Registered by provisioner.cli.main (GROUPS)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from provisioner.cli.context import CliContext
from provisioner.cli.daemons import add_log_format
from provisioner.errors import EXIT_OK, NotFoundError, UnavailableError, ValidationError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "service", help="declared services (CE, SE, WMS...) that HA keeps running", description=__doc__
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("declare", help="declare (or change) a service")
    d.add_argument("name", metavar="NAME")
    d.add_argument("--image", required=True, metavar="REF", help="a service image, e.g. ce:stable")
    d.add_argument(
        "--priority", choices=["critical", "high", "normal"], help="default: the image's HA policy"
    )
    d.add_argument("--address", metavar="IP", help="fixed IPv4 address (kept wherever it runs)")
    d.add_argument("--anti-affinity", metavar="GROUP", help="default: the image's HA policy")
    d.add_argument("--after", action="append", default=[], metavar="OTHER", help="start after this service")
    d.set_defaults(func=cmd_declare)
    ls = sub.add_parser("list", help="list declared services")
    ls.set_defaults(func=cmd_list)
    sh = sub.add_parser("show", help="one declared service")
    sh.add_argument("name", metavar="NAME")
    sh.set_defaults(func=cmd_show)
    rm = sub.add_parser("remove", help="forget a declaration (its VM is not touched)")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=cmd_remove)
    ex = sub.add_parser("export", help="print every declaration as YAML (for git)")
    ex.set_defaults(func=cmd_export)
    ap = sub.add_parser("apply", help="declare every service of a YAML file (as written by export)")
    ap.add_argument("file", metavar="FILE", type=Path)
    ap.add_argument("--prune", action="store_true", help="also remove services the file does not name")
    ap.set_defaults(func=cmd_apply)

    ha = subparsers.add_parser("ha", help="high availability: status, pause, resume")
    hs = ha.add_subparsers(dest="command", metavar="COMMAND")
    st = hs.add_parser("status", help="hosts, lease ages, leader, open recoveries, reserve, last failovers")
    st.set_defaults(func=cmd_ha_status)
    pa = hs.add_parser("pause", help="no automatic failover until resumed")
    pa.add_argument("--reason", default="operator", help="shown in ha status")
    pa.set_defaults(func=cmd_ha_pause)
    hs.add_parser("resume", help="allow automatic failover again").set_defaults(func=cmd_ha_resume)
    tl = hs.add_parser("timeline", help="a host's latest failover step by step, with times")
    tl.add_argument("host", metavar="HOST")
    tl.set_defaults(func=cmd_ha_timeline)

    mon = subparsers.add_parser("monitor", help="run a monitor (one leads; the others stand by)")
    mon.add_argument("--round", type=float, default=None, metavar="S",
                     help="seconds between rounds (default: the configuration's ha.round_s)")
    mon.add_argument("--lease", type=float, default=None, metavar="S",
                     help="leader lease, the takeover time (default: ha.leader_lease_s)")
    add_log_format(mon)
    mon.set_defaults(func=cmd_monitor)

    wd = subparsers.add_parser(
        "watchdog",
        help="a host's watchdog: kills its HA guests when its agent stops petting (agents start it)",
    )
    wd.add_argument("--host", required=True, metavar="NAME")
    add_log_format(wd)
    wd.set_defaults(func=cmd_watchdog)


def _store(ctx: CliContext) -> Any:
    from ha.services import ServiceStore
    from provisioner.cli.common import runtime

    rt = runtime(ctx)
    return ServiceStore(rt.store.r, rt.store.keys.prefix)


def _declaration(ctx: CliContext, raw: dict[str, Any], where: str) -> Any:
    """Validate ``raw``; the image must be a service image, and priority and anti-affinity default to
    its HA policy when ``raw`` does not give them."""
    from ha.services import parse_service
    from provisioner.catalogue.model import ImageKind

    svc = parse_service(raw, where)  # validates every field before the catalogue is asked
    image = ctx.catalogue.resolve(svc.image)
    if image.kind is not ImageKind.SERVICE:
        raise ValidationError(f"{where} {svc.name}: image {image.ref} is a worker image, not a service")
    full = dict(raw)
    if full.get("priority") is None:
        full["priority"] = image.ha.priority.value if image.ha else "normal"
    if full.get("anti_affinity") is None and image.ha and image.ha.anti_affinity:
        full["anti_affinity"] = image.ha.anti_affinity
    return parse_service(full, where)


def cmd_declare(ctx: CliContext, args: argparse.Namespace) -> int:
    from ha.services import check_set

    raw = {
        "name": args.name,
        "image": args.image,
        "priority": args.priority,
        "address": args.address,
        "anti_affinity": args.anti_affinity,
        "after": args.after,
    }
    raw = {k: v for k, v in raw.items() if v is not None}
    svc = _declaration(ctx, raw, "service")
    store = _store(ctx)
    check_set([svc], known={s.name for s in store.all()})
    store.declare(svc)
    ctx.out.obj(svc.to_dict(), title=f"service {svc.name} declared")
    return EXIT_OK


def cmd_list(ctx: CliContext, args: argparse.Namespace) -> int:
    rows = [s.to_dict() for s in _store(ctx).all()]
    ctx.out.table(rows, ["name", "image", "priority", "address", "anti_affinity", "after"], title="services")
    return EXIT_OK


def cmd_show(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.state.keys import check_id

    svc = _store(ctx).require(check_id(args.name, "service name"))
    ctx.out.obj(svc.to_dict(), title=f"service {svc.name}")
    return EXIT_OK


def cmd_remove(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.state.keys import check_id

    name = check_id(args.name, "service name")
    if not _store(ctx).remove(name):
        raise NotFoundError(f"service {name!r} is not declared")
    ctx.out.message(f"service {name} removed (its VM, if any, keeps running until released)")
    return EXIT_OK


def cmd_export(ctx: CliContext, args: argparse.Namespace) -> int:
    import yaml

    doc = {"services": [s.to_dict() for s in _store(ctx).all()]}
    if ctx.out.json:
        ctx.out.obj(doc)
    else:
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return EXIT_OK


def cmd_apply(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner import yamlio

    doc = yamlio.load(args.file, ValidationError)
    items = doc.data.get("services") if isinstance(doc.data, dict) else None
    if not isinstance(items, list):
        raise ValidationError(f"{args.file}: expected a mapping with a 'services' list")
    svcs = []
    for i, raw in enumerate(items):
        where = f"{args.file}:{doc.line(('services', i)) or '?'}: services[{i}]"
        if not isinstance(raw, dict):
            raise ValidationError(f"{where}: expected a mapping")
        svcs.append(_declaration(ctx, raw, where))
    declared, removed = _store(ctx).apply(svcs, prune=args.prune)
    ctx.out.obj({"declared": declared, "removed": removed}, title=f"applied {args.file}")
    return EXIT_OK


def cmd_ha_status(ctx: CliContext, args: argparse.Namespace) -> int:
    from ha.status import ha_status
    from provisioner.cli.common import runtime

    st = ha_status(runtime(ctx))
    if ctx.out.json:
        ctx.out.obj(st)
        return EXIT_OK
    ctx.out.obj({k: v for k, v in st.items() if k not in ("hosts", "recoveries", "monitors", "failovers")},
                title="HA")
    ctx.out.table(st["hosts"], ["name", "state", "lease_age_s", "lease", "detection_class", "loops"],
                  title="hosts")
    ctx.out.table(st["monitors"], ["member", "leading", "fence", "rounds", "errors", "age_s", "last_error"],
                  title="monitors")
    if st["recoveries"]:
        ctx.out.table(st["recoveries"], ["host", "step", "fence", "reason"], title="open recoveries")
    if st["failovers"]:
        ctx.out.table(st["failovers"], ["ts", "host", "message"], title="last failovers")
    return EXIT_OK


def cmd_ha_pause(ctx: CliContext, args: argparse.Namespace) -> int:
    from ha.world import RedisWorld
    from provisioner.cli.common import runtime

    rt = runtime(ctx)
    reason = f"paused by operator: {str(args.reason)[:200]}"
    RedisWorld(rt).pause(reason)
    rt.store.add_event("ha_paused", reason)
    ctx.out.message("HA paused: no automatic failover until 'dynvm ha resume'")
    return EXIT_OK


def cmd_ha_resume(ctx: CliContext, args: argparse.Namespace) -> int:
    from ha.world import RedisWorld
    from provisioner.cli.common import runtime

    rt = runtime(ctx)
    was = RedisWorld(rt).resume()
    rt.store.add_event("ha_resumed", "resumed by operator" if was else "resume: was not paused")
    ctx.out.message("HA resumed" if was else "HA was not paused")
    return EXIT_OK


def cmd_ha_timeline(ctx: CliContext, args: argparse.Namespace) -> int:
    from ha.timeline import build
    from provisioner.cli.common import runtime
    from provisioner.state.keys import check_id

    host = check_id(args.host, "host name")
    rt = runtime(ctx)
    rows, base = build(rt.store.read_events(count=10_000), host)
    if not rows:
        raise NotFoundError(f"no failover of host {host} in the event stream")
    ctx.out.table([r.to_dict(base) for r in rows], ["ts", "after_s", "step", "instance", "host", "message"],
                  title=f"failover of {host} (after_s: seconds since its last lease renewal)")
    return EXIT_OK


def cmd_monitor(ctx: CliContext, args: argparse.Namespace) -> int:
    import math
    import signal
    import threading

    from ha.engine import Settings
    from ha.monitor import Monitor, MonitorSettings
    from provisioner.cli.common import runtime
    from provisioner.oplog import setup

    for name in ("round", "lease"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and 0.01 <= v <= 3600):
            raise ValidationError(f"monitor --{name}: {v} is not between 0.01 and 3600 seconds")
    rt = runtime(ctx)
    setup(args.log_format)
    ha = rt.config.ha
    engine = Settings(
        storm_share=ha.storm_share, safety_margin_s=ha.safety_margin_s, watchdog_s=ha.watchdog_s
    )
    settings = MonitorSettings(
        round_s=args.round if args.round is not None else ha.round_s,
        lease_ttl_s=args.lease if args.lease is not None else ha.leader_lease_s,
        engine=engine,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Monitor(rt, settings).run(stop)
    return EXIT_OK


def watchdog_timeout_s(config: Any, host: str) -> float:
    """At least one lease TTL (the agent pets at each renewal, every third of it) and never more than
    the monitor assumes (ha.fencing.restart_allowed_after: max(lease TTL, watchdog_s))."""
    hc = config.host(host)
    ttl = config.detection_classes[hc.detection_class].lease_ttl_s
    return float(max(config.ha.watchdog_s, ttl))


def cmd_watchdog(ctx: CliContext, args: argparse.Namespace) -> int:
    """Exit 4 if a watchdog already runs for the host; 0 on SIGTERM or when its lock file is removed."""
    import signal
    import threading

    from ha.watchdog import serve
    from provisioner.agent.handover import run_dir
    from provisioner.hypervisor.libvirt_host import LibvirtHost
    from provisioner.oplog import setup
    from provisioner.yamlio import short_repr

    config = ctx.config
    hc = config.host(args.host)
    if hc is None:
        raise NotFoundError(f"host {short_repr(args.host)} is not in the configuration ({config.source})")
    setup(args.log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hv = LibvirtHost(hc.uri, call_timeout_s=config.timeouts.libvirt_call_s)
    try:
        serve(hv, run_dir(config), hc.name, watchdog_timeout_s(config, hc.name), stop)
    except OSError as err:  # an unwritable run dir: one line, exit 5
        raise UnavailableError(f"watchdog {hc.name}: {err.strerror or err}: {err.filename or ''}") from None
    finally:
        hv.close()
    return EXIT_OK
