"""Each filter on its own, table-driven: which host a single request lands on (or that none passes)."""

from __future__ import annotations

import pytest

from provisioner.errors import ValidationError
from provisioner.model import HostState, InstanceState
from provisioner.scheduler import PlacementRequest, SchedulerPolicy, schedule
from tests.scheduler.factory import host, req, snap, vm

CASES = [
    # (title, hosts, instances, request kwargs, policy kwargs, expected host or None)
    ("state: only up hosts", [host("a", state=HostState.DRAINING), host("b")], [], {}, {}, "b"),
    *[
        (f"state: {s.value} refused", [host("a", state=s)], [], {}, {}, None)
        for s in HostState
        if s is not HostState.UP
    ],
    ("capacity: vcpus", [host("a", vcpus=2), host("b", vcpus=4)], [], {"vcpus": 3}, {}, "b"),
    ("capacity: memory", [host("a", mem=1024), host("b", mem=4096)], [], {"mem": 2048}, {}, "b"),
    ("capacity: used counts", [host("a", 4), host("b", 4)], [vm("x", "a", 3)], {"vcpus": 2}, {}, "b"),
    ("capacity: exact fit", [host("a", vcpus=4, mem=4096)], [], {"vcpus": 4, "mem": 4096}, {}, "a"),
    ("capacity: nothing fits", [host("a", vcpus=2)], [], {"vcpus": 3}, {}, None),
    ("capacity: cpu overcommit", [host("a", vcpus=2)], [], {"vcpus": 3}, {"cpu_overcommit": 1.5}, "a"),
    ("capacity: overcommit floors", [host("a", vcpus=3)], [], {"vcpus": 4}, {"cpu_overcommit": 1.3}, None),
    ("capacity: mem overcommit", [host("a", mem=1000)], [], {"mem": 1500}, {"memory_overcommit": 1.5}, "a"),
    ("labels: match", [host("a", rack="r1"), host("b", rack="r2")], [], {"labels": {"rack": "r2"}}, {}, "b"),
    (
        "labels: all required",
        [host("a", rack="r1"), host("b", rack="r1", gpu="yes")],
        [],
        {"labels": {"rack": "r1", "gpu": "yes"}},
        {},
        "b",
    ),
    ("labels: unknown value", [host("a", rack="r1")], [], {"labels": {"rack": "r9"}}, {}, None),
    (
        "anti-affinity: avoid group member",
        [host("a"), host("b")],
        [vm("x", "a", group="ce")],
        {"anti_affinity": "ce"},
        {},
        "b",
    ),
    (
        "anti-affinity: other group ignored",
        [host("a"), host("b", vcpus=1)],
        [vm("x", "a", group="se")],
        {"anti_affinity": "ce"},
        {},
        "a",
    ),
    (
        "anti-affinity: gone member ignored",
        [host("a"), host("b", vcpus=4)],
        [vm("x", "a", group="ce", state=InstanceState.GONE)],
        {"anti_affinity": "ce"},
        {},
        "a",
    ),
    (
        "anti-affinity: every host taken",
        [host("a"), host("b")],
        [vm("x", "a", group="ce"), vm("y", "b", group="ce")],
        {"anti_affinity": "ce"},
        {},
        None,
    ),
    ("pinned: on that host only", [host("a", vcpus=64), host("b")], [], {"pinned_host": "b"}, {}, "b"),
    (
        "pinned: host full",
        [host("a", vcpus=64), host("b", vcpus=1)],
        [vm("x", "b")],
        {"pinned_host": "b"},
        {},
        None,
    ),
    ("pinned: unknown host", [host("a")], [], {"pinned_host": "zz"}, {}, None),
    ("pinned: host down", [host("a", state=HostState.DEAD)], [], {"pinned_host": "a"}, {}, None),
    (
        "quota: instances",
        [host("a")],
        [vm("x", "a", vo="cms")],
        {"vo": "cms"},
        {"vo_quotas": {"cms": (None, 1)}},
        None,
    ),
    (
        "quota: vcpus",
        [host("a")],
        [vm("x", "a", 3, vo="cms")],
        {"vo": "cms", "vcpus": 2},
        {"vo_quotas": {"cms": (4, None)}},
        None,
    ),
    (
        "quota: within",
        [host("a")],
        [vm("x", "a", 2, vo="cms")],
        {"vo": "cms", "vcpus": 2},
        {"vo_quotas": {"cms": (4, 2)}},
        "a",
    ),
    (
        "quota: other vo free",
        [host("a")],
        [vm("x", "a", 4, vo="cms")],
        {"vo": "lhcb"},
        {"vo_quotas": {"cms": (4, 1)}},
        "a",
    ),
    (
        "quota: failed instances not counted",
        [host("a")],
        [vm("x", "a", 4, vo="cms", state=InstanceState.FAILED)],
        {"vo": "cms"},
        {"vo_quotas": {"cms": (4, 1)}},
        "a",
    ),
]


@pytest.mark.parametrize(
    ("title", "hosts", "instances", "rkw", "pkw", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_filter(title: str, hosts, instances, rkw, pkw, expected) -> None:  # type: ignore[no-untyped-def]
    plan = schedule([req("new", **rkw)], snap(hosts, instances), SchedulerPolicy(preemption=False, **pkw))
    assert plan.placements.get("new") == expected, str(plan.unplaced.get("new"))
    assert ("new" in plan.unplaced) == (expected is None)


def test_existing_record_does_not_count_against_its_own_quota() -> None:
    # Re-placing instance x (e.g. it is requested again): its own record must not use up the quota.
    s = snap([host("a")], [vm("x", "a", 2, vo="cms", state=InstanceState.REQUESTED)])
    plan = schedule([req("x", 2, vo="cms")], s, SchedulerPolicy(vo_quotas={"cms": (2, 1)}))
    assert plan.placements == {"x": "a"}


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "a/b", "a{b}", "a\nb"])
def test_request_ids_are_validated(bad: str) -> None:
    with pytest.raises(ValidationError):
        PlacementRequest(bad, 1, 1)


def test_sizes_are_validated() -> None:
    with pytest.raises(ValidationError, match="vcpus=0"):
        PlacementRequest("a", 0, 1)
