"""``dynvm host list|show|drain|undrain|rejoin|fence|maintenance|remove``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from provisioner.cli.argtypes import seconds
from provisioner.cli.common import runtime, ts
from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK, ConflictError, NotFoundError
from provisioner.model import Host, HostState

COLUMNS = ["name", "state", "lease", "vcpus", "memory_mib", "instances", "labels", "uri"]


def register(sub: Any) -> None:
    host = sub.add_parser("host", help="hypervisor hosts")
    hs = host.add_subparsers(dest="host_cmd", metavar="COMMAND")
    hs.add_parser("list", help="all hosts").set_defaults(func=host_list)
    show = hs.add_parser("show", help="one host")
    show.add_argument("name")
    show.add_argument("--inventory", action="store_true", help="also ask the agent what libvirt runs there")
    show.set_defaults(func=host_show)
    drain = hs.add_parser("drain", help="refuse new placements; move service VMs away live")
    drain.add_argument("name")
    drain.add_argument("--wait", action="store_true", help="wait until its service VMs have moved")
    drain.add_argument("--timeout", type=seconds(), default=600.0)
    drain.set_defaults(func=host_drain)
    undrain = hs.add_parser("undrain", help="accept placements again")
    undrain.add_argument("name")
    undrain.set_defaults(func=host_undrain)
    rejoin = hs.add_parser("rejoin", help="bring a dead/fenced host back (after checking it by hand)")
    rejoin.add_argument("name")
    rejoin.set_defaults(func=host_rejoin)
    fence = hs.add_parser(
        "fence", help="run the host's configured fence command (power off) and mark it fenced"
    )
    fence.add_argument("name")
    fence.add_argument(
        "--manual", action="store_true", help="no fence command configured: you powered it off yourself"
    )
    fence.set_defaults(func=host_fence)
    maint = hs.add_parser(
        "maintenance", help="HA disarmed: its death is not acted on, nothing is placed on it (VMs stay)"
    )
    maint.add_argument("name")
    maint.set_defaults(func=host_maintenance)
    remove = hs.add_parser(
        "remove", help="retire a host: forget it (refused while it holds VMs or its agent runs)"
    )
    remove.add_argument("name")
    remove.add_argument(
        "--force", action="store_true", help="remove it even while it holds VMs or its agent holds the lease"
    )
    remove.set_defaults(func=host_remove)


def _row(rt: Any, h: Host, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "name": h.name,
        "state": h.state,
        "lease": "alive" if rt.store.lease_alive(h.name) else "expired",
        "vcpus": f"{h.used_vcpus}/{h.capacity.vcpus}",
        "memory_mib": f"{h.used_memory_mib}/{h.capacity.memory_mib}",
        "instances": counts.get(h.name, 0),
        "labels": ",".join(f"{k}={v}" for k, v in sorted(h.labels.items())),
        "uri": h.uri,
        "last_seen": ts(h.last_seen),
    }


def _counts(rt: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in rt.store.list_instances():
        if i.host and i.state.value not in ("gone", "failed", "lost"):
            counts[i.host] = counts.get(i.host, 0) + 1
    return counts


def host_list(ctx: CliContext, args: argparse.Namespace) -> int:
    rt = runtime(ctx)
    counts = _counts(rt)
    ctx.out.table([_row(rt, h, counts) for h in rt.store.list_hosts()], COLUMNS, title="hosts")
    return EXIT_OK


def _get(rt: Any, name: str) -> Host:
    h = rt.store.get_host(name)
    if h is None:
        raise NotFoundError(
            f"host {name!r} not found (known: {', '.join(x.name for x in rt.store.list_hosts())})"
        )
    return h  # type: ignore[no-any-return]


def host_show(ctx: CliContext, args: argparse.Namespace) -> int:
    rt = runtime(ctx)
    h = _get(rt, args.name)
    row = _row(rt, h, _counts(rt))
    row["instances"] = [i.id for i in rt.store.list_instances(host=h.name) if i.state.value != "gone"]
    health = rt.store.lease_health(h.name)  # as the agent left it with its last successful renewal
    row["state_reason"] = rt.store.host_reason(h.name)
    row["lease_failures"] = health.failures
    row["lease_refusals"] = health.refusals
    row["lease_losses"] = health.losses
    row["lease_last_error"] = health.last_error
    from provisioner.agent.loops import loop_fields, read_loops  # the agent's loops: last pass, errors

    row.update(loop_fields(read_loops(rt.store.r, rt.store.keys.prefix, h.name), time.time()))
    if args.inventory:
        from provisioner.control.inventory import host_inventory

        row["libvirt_domains"] = [f"{d['name']} ({d['state']})" for d in host_inventory(rt, h.name)]
    ctx.out.obj(row, title=f"host {h.name}")
    return EXIT_OK


def host_drain(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.control.maintenance import drain, wait_drained

    rt = runtime(ctx)
    _get(rt, args.name)
    moves = drain(rt, args.name)
    if args.wait:
        wait_drained(rt, args.name, args.timeout)
    ctx.out.obj({"name": args.name, "state": HostState.DRAINING, "moving": moves, "at": ts(time.time())})
    return EXIT_OK


def host_undrain(ctx: CliContext, args: argparse.Namespace) -> int:
    rt = runtime(ctx)
    h = _get(rt, args.name)
    if h.state not in (HostState.UP, HostState.DRAINING, HostState.MAINTENANCE):
        raise ConflictError(
            f"host {h.name} is {h.state.value}; a fenced/dead host rejoins only by "
            "`dynvm host rejoin` after the operator checked it"
        )
    rt.store.set_host_state(h.name, HostState.UP, expected=h.state, reason="operator undrain", operator=True)
    rt.store.add_event("host_up", host=h.name, message="accepting placements")
    ctx.out.obj({"name": h.name, "state": HostState.UP, "at": ts(time.time())})
    return EXIT_OK


def host_rejoin(ctx: CliContext, args: argparse.Namespace) -> int:
    """Operator action: a dead/fenced host accepts placements again, once its agent holds the lease."""
    rt = runtime(ctx)
    h = _get(rt, args.name)
    if h.state not in (HostState.DEAD, HostState.FENCED):
        raise ConflictError(f"host {h.name} is {h.state.value}; rejoin is for dead/fenced hosts (undrain?)")
    if not rt.store.lease_alive(h.name):
        raise ConflictError(f"host {h.name}: no agent holds its lease; start its agent first")
    rt.store.set_host_state(h.name, HostState.UP, expected=h.state, reason="operator rejoin", operator=True)
    rt.store.add_event("host_rejoined", host=h.name, message=f"was {h.state.value}; accepting placements")
    ctx.out.obj({"name": h.name, "state": HostState.UP, "was": h.state, "at": ts(time.time())})
    return EXIT_OK


def host_fence(ctx: CliContext, args: argparse.Namespace) -> int:
    """Exit 2 without a fence command (unless --manual), 5 when the command fails (the host is left as it
    was), 4 when the host changed meanwhile.  The state moves by compare-and-set from what was read."""
    from ha.engine import FenceResult
    from ha.world import RedisWorld
    from provisioner.errors import UnavailableError, ValidationError

    rt = runtime(ctx)
    h = _get(rt, args.name)
    result = RedisWorld(rt).fence_host(h.name)  # argument vector + host name, timeout; records events
    if result is FenceResult.FAILED:
        raise UnavailableError(f"host {h.name}: fence command failed (see `dynvm events`); state unchanged")
    if result is FenceResult.NOT_CONFIGURED and not args.manual:
        raise ValidationError(
            f"host {h.name}: no fence_command in {ctx.config.source}; power it off yourself and pass --manual"
        )
    how = "fence command succeeded" if result is FenceResult.OK else "fenced by hand (--manual)"
    state, why = h.state, f"operator: {how}"
    if state not in (HostState.DEAD, HostState.FENCED):  # dead first: the table's only way to fenced
        rt.store.set_host_state(h.name, HostState.DEAD, expected=state, reason=why, operator=True)
        state = HostState.DEAD
    if state is HostState.DEAD:
        rt.store.set_host_state(h.name, HostState.FENCED, expected=state, reason=why, operator=True)
    rt.store.add_event("host_fenced", f"by operator: {how}; was {h.state.value}", host=h.name)
    row = {"name": h.name, "state": HostState.FENCED, "was": h.state, "how": how}
    ctx.out.obj({**row, "at": ts(time.time())})
    return EXIT_OK


def host_maintenance(ctx: CliContext, args: argparse.Namespace) -> int:
    """HA disarmed: the monitors ignore its lease (no failover), the scheduler places nothing there; its
    VMs keep running.  Back with `host undrain` (or `host rejoin` after a death)."""
    rt = runtime(ctx)
    h = _get(rt, args.name)
    if h.state is not HostState.MAINTENANCE:
        rt.store.set_host_state(
            h.name, HostState.MAINTENANCE, expected=h.state, reason="operator maintenance", operator=True
        )
        rt.store.add_event("host_maintenance", f"HA disarmed (was {h.state.value})", host=h.name)
    ctx.out.obj({"name": h.name, "state": HostState.MAINTENANCE, "was": h.state, "at": ts(time.time())})
    return EXIT_OK


def host_remove(ctx: CliContext, args: argparse.Namespace) -> int:
    """Exit 4 while the host holds VMs (live instance records or claims) or its agent holds the lease:
    its VMs would be forgotten and a running agent would register it again."""
    rt = runtime(ctx)
    h = _get(rt, args.name)
    ended = ("gone", "failed", "lost")
    holding = [i.id for i in rt.store.list_instances(host=h.name) if i.state.value not in ended]
    if not args.force:
        if rt.store.lease_alive(h.name):
            raise ConflictError(
                f"host {h.name}: its agent holds the lease (stop the agent first, or --force)"
            )
        try:
            rt.store.remove_host(h.name, if_idle=True)
        except ConflictError as err:
            raise ConflictError(f"{err}; drain it or release them first, or --force") from None
    else:
        rt.store.remove_host(h.name)
    why = f"operator remove --force ({len(holding)} VM(s) on it)" if args.force else "operator remove"
    rt.store.add_event("host_removed", why, host=h.name)
    row = {"name": h.name, "removed": True, "forced": bool(args.force), "instances_left": holding}
    ctx.out.obj({**row, "at": ts(time.time())})
    return EXIT_OK
