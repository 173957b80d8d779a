"""A failover, step by step with times (``dynvm ha timeline HOST``): the last lease renewal (the death as
far as anyone can tell), host_dead, each recovery step (fenced, planned, started, confirmed, closed), and
per service VM its placement on a survivor and its readiness.  Read from the event stream (stream ids
carry Redis's clock in ms) and the host's latest recovery record; the ordering is pure (``build``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from provisioner.state.events import Event

HOST_KINDS = frozenset({"host_dead", "fenced", "fence_failed", "ha_paused", "ha_resumed", "host_rejoined"})
_SILENT = re.compile(r"lease silent ([0-9.]+) s")


@dataclass(frozen=True, slots=True)
class Row:
    t: float  # Redis time, seconds
    step: str
    instance: str | None
    host: str | None
    message: str

    def to_dict(self, base: float) -> dict[str, Any]:
        return {
            "ts": datetime.fromtimestamp(self.t, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "after_s": round(self.t - base, 3),
            "step": self.step,
            "instance": self.instance,
            "host": self.host,
            "message": self.message,
        }


def event_time(e: Event) -> float:
    return int(e.id.split("-", 1)[0]) / 1000.0


def build(events: Sequence[Event], host: str, since: float = 0.0) -> tuple[list[Row], float]:
    """The rows of the latest failover of ``host`` among ``events`` (oldest first) at or after ``since``,
    and the time they count from (the last lease renewal before host_dead, else host_dead itself)."""
    evs = [e for e in events if event_time(e) >= since]
    deaths = [i for i, e in enumerate(evs) if e.kind == "host_dead" and e.host == host]
    if not deaths:
        return [], since
    evs = evs[deaths[-1]:]
    dead = evs[0]
    base = event_time(dead)
    rows: list[Row] = []
    m = _SILENT.search(dead.message)
    if m:
        base -= float(m.group(1))
        rows.append(Row(base, "last_renewal", None, host, "the host's lease was last renewed (the death)"))
    moved: set[str] = set()
    for e in evs:
        if e.host == host and (e.kind in HOST_KINDS or e.kind.startswith("recovery_")):
            rows.append(Row(event_time(e), e.kind.removeprefix("recovery_"), None, host, e.message))
        elif e.kind == "placed" and e.instance and e.message == f"failover from {host}":
            moved.add(e.instance)
            rows.append(Row(event_time(e), "placed", e.instance, e.host, e.message))
        elif e.instance in moved and e.kind in ("booting", "ready", "failed", "preempted"):
            rows.append(Row(event_time(e), e.kind, e.instance, e.host, e.message))
    return rows, base
