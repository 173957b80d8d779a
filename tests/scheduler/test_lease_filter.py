"""The lease filter: a host whose agent holds no lease takes no VM, and the explanation says so."""

from __future__ import annotations

import pytest

from provisioner.model import Host
from provisioner.scheduler import SchedulerPolicy, schedule
from tests.scheduler.factory import host, req, snap


def with_lease(h: Host, alive: bool | None) -> Host:
    h.lease_alive = alive
    return h


@pytest.mark.parametrize(
    ("leases", "expected"),
    [
        ({"a": True, "b": True}, "a"),  # both alive: the usual choice (a, by name, equally loaded)
        ({"a": False, "b": True}, "b"),  # a's agent is gone
        ({"a": None, "b": None}, "a"),  # not read (a hand-built snapshot): no opinion
        ({"a": False, "b": False}, None),
    ],
)
def test_lease_filter(leases: dict[str, bool | None], expected: str | None) -> None:
    s = snap([with_lease(host(n), alive) for n, alive in leases.items()])
    plan = schedule([req("new")], s, SchedulerPolicy(preemption=False))
    assert plan.placements.get("new") == expected


def test_lease_filter_explains_itself() -> None:
    s = snap([with_lease(host("a"), False), with_lease(host("b", vcpus=1), True)])
    plan = schedule([req("new", 2)], s, SchedulerPolicy(preemption=False))
    text = str(plan.unplaced["new"])
    assert "lease: 1 host out (a: lease expired (no agent renewing it))" in text
    assert "capacity: 1 host out (b: needs 2 vCPU" in text


def test_preemption_never_targets_a_host_without_lease() -> None:
    """Preemption examines only hosts passing every non-capacity filter: a dead agent's host is not one."""
    from provisioner.model import Tier
    from tests.scheduler.factory import vm

    s = snap([with_lease(host("a", vcpus=2), False)], [vm("w", "a", 2)])
    plan = schedule([req("svc", 2, tier=Tier.CRITICAL)], s, SchedulerPolicy())
    assert plan.placements == {} and plan.preemptions == {}
