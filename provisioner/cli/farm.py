"""``dynvm farm up|down|status|kill|revive``: the embedded default on one machine.

``farm up`` on a farm that is already up returns it (and says so) when it is the farm asked for; another
driver, host count or ``--redis-url`` is a conflict (exit 4): the running farm is not changed under its
users, `dynvm farm down` comes first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK


def farm_dir_arg(value: str) -> Path:
    """--dir: never empty (it would silently mean "here"); relative is made absolute by FarmLayout."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty path (give a directory)")
    return Path(value)


def _timeout_arg(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:32]!r} is not a number of seconds") from None
    if not 1 <= t <= 3600:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{value[:32]} s: choose 1..3600")
    return t


def _dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir",
        type=farm_dir_arg,
        default=None,
        help="farm directory (default: $DYNVM_FARM_DIR or /var/lib/dynvm/farm as root)",
    )


def register(sub: Any) -> None:
    farm = sub.add_parser("farm", help="run a whole dynvm farm on this machine")
    fs = farm.add_subparsers(dest="farm_cmd", metavar="COMMAND")
    up = fs.add_parser("up", help="start Redis, one agent per host, a control worker")
    up.add_argument("--hosts", type=int, default=3, help="number of hypervisor hosts (default 3)")
    up.add_argument(
        "--driver",
        choices=["test", "qemu"],
        default="test",
        help="test: libvirt's test driver (default); qemu: real TCG guests (root)",
    )
    _dir_option(up)
    up.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis instead of starting a private one (refused on a running farm that uses another)",
    )
    up.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the previous farm's Redis state, overlays and catalogue (default: start clean); hosts "
        "not in the new layout are removed, or put in maintenance while they hold VMs",
    )
    up.add_argument(
        "--timeout", type=_timeout_arg, default=None, help="seconds to wait for every host (90; qemu 180)"
    )
    up.set_defaults(func=farm_up)
    down = fs.add_parser("down", help="stop everything the farm started")
    _dir_option(down)
    down.set_defaults(func=farm_down)
    st = fs.add_parser("status", help="show the farm's processes")
    _dir_option(st)
    st.set_defaults(func=farm_status)
    kill = fs.add_parser(
        "kill", help="a host dies: SIGKILL its agent, libvirtd, virtlockd and guests, and keep them down"
    )
    kill.add_argument("host", metavar="HOST")
    _dir_option(kill)
    kill.set_defaults(func=farm_kill)
    rev = fs.add_parser(
        "revive", help="start a killed host again (then bring it back with `dynvm host rejoin HOST`)"
    )
    rev.add_argument("host", metavar="HOST")
    _dir_option(rev)
    rev.add_argument("--timeout", type=_timeout_arg, default=60.0, help="seconds to wait for its agent (60)")
    rev.set_defaults(func=farm_revive)


def farm_up(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.farm.local import default_layout, farm_status
    from provisioner.farm.local import farm_up as up

    layout = default_layout(args.dir)
    t0, wall0 = time.monotonic(), time.time()
    timeout = args.timeout or (180.0 if args.driver == "qemu" else 90.0)
    st = up(layout, args.hosts, args.driver, redis_url=args.redis_url, timeout_s=timeout,
            keep_state=args.keep_state)
    status = farm_status(layout)
    status["already_running"] = st.started < wall0
    status["up_seconds"] = round(time.monotonic() - t0, 2)
    ctx.out.obj(status, title="farm up (already running: unchanged)" if st.started < wall0 else "farm up")
    return EXIT_OK


def farm_down(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.farm.local import default_layout
    from provisioner.farm.local import farm_down as down

    layout = default_layout(args.dir)
    was_up = down(layout)
    ctx.out.obj({"dir": str(layout.base), "stopped": was_up}, title="farm down")
    return EXIT_OK


def farm_status(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.farm.local import default_layout
    from provisioner.farm.local import farm_status as status

    ctx.out.obj(status(default_layout(args.dir)), title="farm")
    return EXIT_OK


def farm_kill(ctx: CliContext, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from provisioner.farm.hostkill import farm_kill as kill
    from provisioner.farm.local import default_layout
    from provisioner.state.keys import check_id

    out = kill(default_layout(args.dir), check_id(args.host, "host name"))
    out["killed_at"] = datetime.fromtimestamp(out["killed_at"], UTC)
    ctx.out.obj(out, title=f"host {args.host} killed (kept down until `dynvm farm revive {args.host}`)")
    return EXIT_OK


def farm_revive(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.farm.hostkill import farm_revive as revive
    from provisioner.farm.local import default_layout
    from provisioner.state.keys import check_id

    out = revive(default_layout(args.dir), check_id(args.host, "host name"), timeout_s=args.timeout)
    then = f"an operator brings it back: `dynvm host rejoin {args.host}`"
    ctx.out.obj(out, title=f"host {args.host} revived ({then})")
    return EXIT_OK
