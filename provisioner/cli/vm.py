"""``dynvm vm provision|list|show|release``."""

from __future__ import annotations

import argparse
from typing import Any

from provisioner.cli.argtypes import int_range, seconds
from provisioner.cli.common import instance_row, runtime, ts
from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK, NotFoundError, UsageError
from provisioner.model import InstanceState, Role

COLUMNS = ["id", "state", "role", "image", "vo", "host", "vcpus", "memory_mib", "owner", "reason"]
# Bounds of what a command line may ask for; the image's own bounds are checked when the VM is placed.
MAX_VCPUS = 1024
MAX_MEMORY_MIB = 16 * 1024 * 1024


def register(sub: Any) -> None:
    vm = sub.add_parser("vm", help="virtual machines (instances)")
    vs = vm.add_subparsers(dest="vm_cmd", metavar="COMMAND")
    p = vs.add_parser("provision", help="request a VM")
    p.add_argument("--image", help="image NAME[:VERSION|:CHANNEL] (a bare name means its stable channel)")
    p.add_argument("--vo", help="the VO it is for (a worker image must serve it)")
    p.add_argument("--vcpus", type=int_range(1, MAX_VCPUS))
    p.add_argument("--memory", type=int_range(1, MAX_MEMORY_MIB), metavar="MIB")
    p.add_argument("--key", help="idempotency key: a second request with the same key returns the first VM")
    p.add_argument("--owner", help="owner label (e.g. a batch job key)")
    p.add_argument("--name", help="service name (service images): fixes its MAC address")
    p.add_argument("--ip", help="fixed IPv4 address of a service VM (given to the guest on its command line)")
    p.add_argument("--wait", action="store_true", help="wait until it is ready (or failed)")
    p.add_argument("--timeout", type=seconds(), default=300.0, help="seconds to wait (default 300)")
    p.set_defaults(func=vm_provision)
    ls = vs.add_parser("list", help="VMs")
    ls.add_argument("--host")
    ls.add_argument("--state", choices=[s.value for s in InstanceState])
    ls.add_argument("--role", choices=[r.value for r in Role])
    ls.add_argument(
        "--all",
        "--history",
        dest="all",
        action="store_true",
        help="include ended VMs (gone, failed, lost) still within the retention",
    )
    ls.set_defaults(func=vm_list)
    show = vs.add_parser("show", help="one VM")
    show.add_argument("id")
    show.set_defaults(func=vm_show)
    for name, text, func in (
        ("migrate", "live-migrate a VM to another host", vm_migrate),
        ("recover", "start a lost/failed service VM again on another host", vm_recover),
    ):
        move = vs.add_parser(name, help=text)
        move.add_argument("id")
        move.add_argument("--to", dest="to", help="destination host (default: the scheduler's choice)")
        move.add_argument("--wait", action="store_true")
        move.add_argument("--timeout", type=seconds(), default=300.0)
        move.set_defaults(func=func)
    rel = vs.add_parser("release", help="stop and remove a VM")
    rel.add_argument("id")
    rel.add_argument("--wait", action="store_true")
    rel.add_argument("--timeout", type=seconds(), default=120.0)
    rel.set_defaults(func=vm_release)


def vm_provision(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.catalogue.model import ImageKind
    from provisioner.control.client import choose_image, submit, wait
    from provisioner.identity import validate_token

    if args.key is not None:
        validate_token(args.key, "--key", r"^[A-Za-z0-9_.:-]+$", 128)
    if args.owner is not None:
        validate_token(args.owner, "--owner", r"^[A-Za-z0-9_.:@-]+$", 128)
    if args.name is not None:
        validate_token(args.name, "--name", r"^[a-z][a-z0-9-]{0,62}$", 63)
    rt = runtime(ctx)
    image, vo = choose_image(rt, args.image, args.vo)
    if image.kind is not ImageKind.SERVICE:
        given = [opt for opt, v in (("--name", args.name), ("--ip", args.ip)) if v is not None]
        if given:
            raise UsageError(
                f"{' and '.join(given)} apply to service images only; {image.ref} is a {image.kind} image"
            )
    inst, created = submit(
        rt,
        image,
        vo,
        owner=args.owner,
        idempotency_key=args.key,
        vcpus=args.vcpus,
        memory_mib=args.memory,
        service=args.name,
        ip=args.ip,
    )
    if args.wait:
        inst = wait(rt, inst.id, args.timeout)
    row = instance_row(inst.to_dict())
    row["created_now"] = created
    ctx.out.obj(row, title=f"vm {inst.id}")
    if inst.state in (InstanceState.FAILED, InstanceState.LOST):
        from provisioner.errors import EXIT_CONFLICT

        return EXIT_CONFLICT
    return EXIT_OK


def vm_list(ctx: CliContext, args: argparse.Namespace) -> int:
    rt = runtime(ctx)
    state = InstanceState(args.state) if args.state else None
    role = Role(args.role) if args.role else None
    # Live VMs by default (O(live)); ended ones come from the cold records on request.
    insts = rt.store.list_instances(host=args.host, state=state, role=role, ended=args.all)
    rows = [instance_row(i.to_dict()) for i in insts]
    rows.sort(key=lambda r: r["created"] or 0)
    ctx.out.table(rows, COLUMNS, title="vms")
    return EXIT_OK


def vm_show(ctx: CliContext, args: argparse.Namespace) -> int:
    rt = runtime(ctx)
    inst = rt.store.get_instance(args.id)
    if inst is None:
        raise NotFoundError(f"vm {args.id!r} not found")
    row = instance_row(inst.to_dict())
    from ha.health import HealthStore

    # The agent's health probe verdict on this placement (service VMs; none until a probe has run).
    mark = HealthStore(rt.store.r, rt.store.keys.prefix).get(inst.id)
    if mark is not None and mark.epoch == inst.epoch:
        row["health"] = mark.mark.value
        row["health_failures"] = mark.failures
        row["health_since"] = ts(mark.at)
        if mark.detail:
            row["health_detail"] = mark.detail
    ctx.out.obj(row, title=f"vm {inst.id}")
    return EXIT_OK


def vm_release(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.control.client import ENDED, release, wait

    rt = runtime(ctx)
    inst = release(rt, args.id)
    if args.wait:
        inst = wait(rt, args.id, args.timeout, until=ENDED)
    ctx.out.obj(instance_row(inst.to_dict()), title=f"vm {inst.id}")
    return EXIT_OK


# Events after which a migration will not land: --wait returns at once with them.
MIGRATION_ENDS = ("migration_failed", "migration_refused", "migration_orphaned")


def vm_migrate(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.control.maintenance import migrate

    rt = runtime(ctx)
    since = rt.store.last_event_id()  # before the request: its failure cannot be missed
    dest = migrate(rt, args.id, args.to)
    inst = rt.store.require_instance(args.id)
    if args.wait:
        inst = _wait_migrated(rt, args.id, dest, since, args.timeout)
    row = instance_row(inst.to_dict())
    row["destination"] = dest
    ctx.out.obj(row, title=f"vm {inst.id}")
    return EXIT_OK


def _wait_migrated(rt: Any, iid: str, dest: str, since: str, timeout_s: float) -> Any:
    """Until the VM is ready on ``dest``; a failure event of its migration ends the wait at once (exit 4)."""
    import time

    from provisioner.errors import ConflictError, DeadlineExceeded

    deadline = time.monotonic() + timeout_s
    while True:
        for ev in rt.store.read_events(count=1000, since_id=since):
            since = ev.id
            if ev.instance == iid and ev.kind in MIGRATION_ENDS:
                raise ConflictError(f"vm {iid}: migration to {dest} did not happen ({ev.kind}): {ev.message}")
        inst = rt.store.require_instance(iid)
        if inst.host == dest and inst.state is InstanceState.READY:
            return inst
        if inst.state not in (InstanceState.READY, InstanceState.MIGRATING):
            raise ConflictError(f"vm {iid} is {inst.state.value} (on {inst.host or '-'}), not on {dest}")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"vm {iid} not on {dest} after {timeout_s:.0f} s")
        rt.store.wait_notified(iid, min(0.5, max(deadline - time.monotonic(), 0.01)))


def vm_recover(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.control.client import wait
    from provisioner.control.maintenance import recover

    rt = runtime(ctx)
    recover(rt, args.id, args.to)
    inst = wait(rt, args.id, args.timeout) if args.wait else rt.store.require_instance(args.id)
    ctx.out.obj(instance_row(inst.to_dict()), title=f"vm {inst.id}")
    return EXIT_OK if inst.state is not InstanceState.FAILED else 4
