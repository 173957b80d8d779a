"""The failover timeline (ha.timeline.build) over a canned event stream."""

from __future__ import annotations

from ha.timeline import build
from provisioner.state.events import Event


def ev(ms: int, kind: str, host: str | None = None, instance: str | None = None, message: str = "") -> Event:
    return Event(f"{ms}-0", "", kind, instance, host, message)


def test_latest_failover_counted_from_the_last_renewal() -> None:
    events = [
        ev(1_000, "host_dead", "hv1", message="lease silent 2.00 s (class allows 2 s)"),  # an older one
        ev(50_000, "ready", "hv2", "i-9"),
        ev(100_000, "host_dead", "hv1", message="lease silent 2.50 s (class allows 2.5 s)"),
        ev(100_100, "recovery_fenced", "hv1"),
        ev(100_120, "placed", "hv2", "i-1", "failover from hv1"),
        ev(100_130, "placed", "hv3", "i-2", "failover from hv2"),  # another host's failover
        ev(100_140, "recovery_planned", "hv1", message="planned; placements i-1->hv2"),
        ev(100_150, "recovery_started", "hv1"),
        ev(101_900, "ready", "hv2", "i-1"),
        ev(101_950, "ready", "hv3", "i-2"),
        ev(102_000, "recovery_confirmed", "hv1"),
        ev(102_000, "recovery_closed", "hv1"),
    ]
    rows, base = build(events, "hv1")
    assert base == 97.5
    assert [(r.step, r.instance) for r in rows] == [
        ("last_renewal", None), ("host_dead", None), ("fenced", None), ("placed", "i-1"), ("planned", None),
        ("started", None), ("ready", "i-1"), ("confirmed", None), ("closed", None),
    ]
    assert rows[-1].to_dict(base)["after_s"] == 4.5
    assert build(events, "hv7") == ([], 0.0)
