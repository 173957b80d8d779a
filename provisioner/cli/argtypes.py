"""argparse ``type=`` converters with bounds: a bad number is a usage error (exit 2) at parse time.

Parsing happens before any handler runs, so a command never acts on an argument it would later refuse
(``agent --concurrency -1`` used to run its start-up reconcile first).  NaN and infinities are refused
everywhere: ``float("nan")`` compares false with every bound and slipped through ``> 0`` checks.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from provisioner.yamlio import short_repr

MAX_SECONDS = 7 * 24 * 3600.0  # a week: longer than any wait a command line should block for


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in [lo, hi]."""

    def convert(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{short_repr(text)} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{short_repr(value)} is out of range ({lo}..{hi})")
        return value

    convert.__name__ = "int"  # argparse names the type in its messages
    return convert


def seconds(lo: float = 0.0, hi: float = MAX_SECONDS, *, allow_lo: bool = False) -> Callable[[str], float]:
    """A finite number of seconds in (lo, hi] (or [lo, hi] with ``allow_lo``)."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{short_repr(text)} is not a number of seconds") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{short_repr(text)} is not a finite number of seconds")
        low_ok = value >= lo if allow_lo else value > lo
        if not (low_ok and value <= hi):
            bound = f"{'>=' if allow_lo else '>'} {lo:g} and <= {hi:g}"
            raise argparse.ArgumentTypeError(f"{short_repr(text)} seconds is out of range (must be {bound})")
        return value

    convert.__name__ = "seconds"
    return convert


def nonempty(what: str, max_len: int = 4096) -> Callable[[str], str]:
    """A string that is not empty (an empty path silently meant "not given")."""

    def convert(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        if len(text) > max_len or "\x00" in text:
            raise argparse.ArgumentTypeError(f"{what} {short_repr(text)} is too long or contains NUL")
        return text

    convert.__name__ = what
    return convert
