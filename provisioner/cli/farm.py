"""``dynvm farm up|down|status``: the embedded default on one machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK


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
    up.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="farm directory (default: $DYNVM_FARM_DIR or /var/lib/dynvm/farm as root)",
    )
    up.add_argument("--redis-url", default=None, help="use this Redis instead of starting a private one")
    up.set_defaults(func=farm_up)
    down = fs.add_parser("down", help="stop everything the farm started")
    down.add_argument("--dir", type=Path, default=None)
    down.set_defaults(func=farm_down)
    st = fs.add_parser("status", help="show the farm's processes")
    st.add_argument("--dir", type=Path, default=None)
    st.set_defaults(func=farm_status)


def farm_up(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.farm.local import default_layout, farm_status
    from provisioner.farm.local import farm_up as up

    layout = default_layout(args.dir)
    t0 = time.monotonic()
    up(layout, args.hosts, args.driver, redis_url=args.redis_url)
    status = farm_status(layout)
    status["up_seconds"] = round(time.monotonic() - t0, 2)
    ctx.out.obj(status, title="farm up")
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
