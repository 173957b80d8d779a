"""A CLI group for tests only: commands that fail in the ways main() must contain."""

from __future__ import annotations

import argparse
from typing import Any

from provisioner.cli.context import CliContext


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("boom")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("crash").set_defaults(func=crash)
    sub.add_parser("interrupt").set_defaults(func=interrupt)
    sub.add_parser("stream").set_defaults(func=stream)


def crash(ctx: CliContext, args: argparse.Namespace) -> int:
    raise RuntimeError("something\nbroke")


def interrupt(ctx: CliContext, args: argparse.Namespace) -> int:
    raise KeyboardInterrupt


def stream(ctx: CliContext, args: argparse.Namespace) -> int:
    import datetime
    import enum

    class Colour(enum.Enum):
        RED = "RED"

    for i in range(2):
        ctx.out.stream({"i": i, "at": datetime.datetime(2026, 11, 24, 1, 2, 3), "colour": Colour.RED})
    return 0
