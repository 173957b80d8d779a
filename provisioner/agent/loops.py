"""An agent's long-lived loops, observable when they stall (STYLE: every loop survives any exception and
can be seen when it stops making progress).

Each loop (``reconcile``, ``health``, ``fencing``) keeps its own counters and writes them to one Redis hash
per host and loop, at most once a second: passes, errors, the last error, the wall-clock time of its last
pass and its period.  ``dynvm host show`` prints them; ``dynvm ha status`` names, for each host whose lease
is alive, the loops that are late (no pass for three periods, and at least ten seconds more than one).  A
loop that hangs stops writing, so it shows as late however it hung.

The fencing loop never writes to Redis itself (its decisions must not wait for a Redis socket timeout):
the lease thread writes its counters after each successful renewal.
"""

from __future__ import annotations

import contextlib
import time
from typing import cast

import redis

from provisioner.state.keys import check_id

LOOPS = ("reconcile", "health", "fencing")
WRITE_EVERY_S = 1.0
TTL_S = 86400  # a host gone for a day leaves no record behind


def loop_key(prefix: str, host: str, loop: str) -> str:
    if loop not in LOOPS:
        raise ValueError(f"unknown agent loop {loop!r}")
    return f"{check_id(prefix, 'key prefix')}:loop:{loop}:{check_id(host, 'host name')}"


def late_after_s(every_s: float) -> float:
    """How long without a pass makes a loop late: three periods, and at least ten seconds beyond one."""
    return max(3 * every_s, every_s + 10.0)


class LoopRecord:
    """One loop's record in Redis; ``write`` is throttled and never raises (Redis down: the counters in
    memory still move, and the next write after Redis is back carries them)."""

    def __init__(self, r: redis.Redis, prefix: str, host: str, loop: str) -> None:
        self.r = r
        self.key = loop_key(prefix, host, loop)
        self._at = float("-inf")

    def write(self, *, passes: int, errors: int, last_error: str, last_run: float, every_s: float,
              **extra: int | str) -> bool:
        now = time.monotonic()
        if now - self._at < WRITE_EVERY_S:
            return False
        self._at = now
        with contextlib.suppress(Exception):
            fields: dict[str, str | int] = {
                "last_run": f"{last_run:.3f}",
                "every_s": f"{every_s:g}",
                "passes": passes,
                "errors": errors,
                "last_error": last_error[:300],
            }
            fields.update(extra)
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(self.key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(self.key, TTL_S)
            pipe.execute()
            return True
        return False


def read_loops(r: redis.Redis, prefix: str, host: str) -> dict[str, dict[str, str]]:
    """Each loop's record (loops that never wrote are absent)."""
    pipe = r.pipeline(transaction=False)
    for loop in LOOPS:
        pipe.hgetall(loop_key(prefix, host, loop))
    raw = cast(list[dict[str, str]], pipe.execute())
    return {loop: rec for loop, rec in zip(LOOPS, raw, strict=True) if rec}


def _age(rec: dict[str, str], now: float) -> float | None:
    try:
        return now - float(rec["last_run"])
    except (KeyError, ValueError):
        return None


def late_loops(loops: dict[str, dict[str, str]], now: float) -> list[str]:
    """``reconcile: no pass for 94 s (every 10 s)`` for each late loop."""
    out = []
    for loop, rec in loops.items():
        age = _age(rec, now)
        try:
            every = float(rec.get("every_s", "0"))
        except ValueError:
            every = 0.0
        if age is not None and every > 0 and age > late_after_s(every):
            out.append(f"{loop}: no pass for {age:.0f} s (every {every:g} s)")
    return out


def loop_fields(loops: dict[str, dict[str, str]], now: float) -> dict[str, str]:
    """For ``dynvm host show``: ``<loop>_loop_<field>`` for each recorded field, and ``<loop>_loop_age_s``."""
    out: dict[str, str] = {}
    for loop, rec in loops.items():
        out.update({f"{loop}_loop_{k}": v for k, v in sorted(rec.items())})
        age = _age(rec, now)
        if age is not None:
            out[f"{loop}_loop_age_s"] = f"{age:.1f}"
    return out
