"""Batches: tier order, start_after, anti-affinity within the batch, pinned hosts, quotas, explanations."""

from __future__ import annotations

import pytest

from provisioner.errors import ValidationError
from provisioner.model import HostState, Tier
from provisioner.scheduler import SchedulerPolicy, order_requests, schedule
from tests.scheduler.factory import host, req, snap, vm


def test_critical_first_gets_the_last_slot() -> None:
    s = snap([host("a", vcpus=2)])
    batch = [req("w", 2, tier=Tier.NORMAL), req("c", 2, tier=Tier.CRITICAL), req("h", 2, tier=Tier.HIGH)]
    plan = schedule(batch, s, SchedulerPolicy(preemption=False))
    assert plan.order == ["c", "h", "w"]
    assert plan.placements == {"c": "a"}
    assert set(plan.unplaced) == {"h", "w"}


def test_start_after_comes_before_tier() -> None:
    batch = [
        req("ce", tier=Tier.CRITICAL, start_after=("db",)),
        req("db", tier=Tier.NORMAL),
        req("x", tier=Tier.HIGH),
    ]
    assert [r.instance_id for r in order_requests(batch)] == ["db", "ce", "x"]


def test_dependency_inherits_the_tier_of_its_dependant() -> None:
    # db is only normal, but critical ce waits for it: db must not queue behind the high-tier x.
    s = snap([host("a", vcpus=2)])
    batch = [
        req("x", 2, tier=Tier.HIGH),
        req("db", 1, tier=Tier.NORMAL),
        req("ce", 1, tier=Tier.CRITICAL, start_after=("db",)),
    ]
    plan = schedule(batch, s, SchedulerPolicy(preemption=False))
    assert plan.placements == {"db": "a", "ce": "a"}


def test_start_after_outside_the_batch_is_ignored() -> None:
    batch = [req("b", tier=Tier.NORMAL), req("a", tier=Tier.CRITICAL, start_after=("elsewhere",))]
    assert [r.instance_id for r in order_requests(batch)] == ["a", "b"]


def test_start_after_cycle_is_refused() -> None:
    with pytest.raises(ValidationError, match="cycle among a, b"):
        order_requests([req("a", start_after=("b",)), req("b", start_after=("a",))])


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValidationError, match="duplicate"):
        schedule([req("a"), req("a")], snap([host("h")]))


def test_anti_affinity_within_the_batch() -> None:
    s = snap([host("a", vcpus=64), host("b"), host("c")])
    plan = schedule([req(f"ce{i}", anti_affinity="ce") for i in range(4)], s)
    assert sorted(plan.placements.values()) == ["a", "b", "c"]
    (left,) = plan.unplaced
    assert "anti_affinity: 3 hosts out" in str(plan.unplaced[left])


def test_batch_sees_its_own_capacity_use() -> None:
    s = snap([host("a", vcpus=4), host("b", vcpus=4)])
    plan = schedule([req(f"n{i}", 2) for i in range(5)], s, SchedulerPolicy(preemption=False))
    assert len(plan.placements) == 4
    assert sorted(plan.placements.values()) == ["a", "a", "b", "b"]


def test_quota_counts_earlier_placements_of_the_batch() -> None:
    s = snap([host("a", vcpus=64)], [vm("old", "a", 2, vo="cms")])
    batch = [req(f"n{i}", 2, vo="cms") for i in range(3)]
    plan = schedule(batch, s, SchedulerPolicy(vo_quotas={"cms": (6, None)}))
    assert len(plan.placements) == 2
    assert str(plan.unplaced["n2"]).endswith("quota: 1 host out (vo cms uses 6 of max 6 vCPU, needs 2)")


def test_pinned_ignores_better_hosts() -> None:
    s = snap([host("big", vcpus=64), host("wn07", vcpus=2)])
    plan = schedule([req("j1", 2, pinned_host="wn07"), req("j2", 1, pinned_host="wn07")], s)
    assert plan.placements == {"j1": "wn07"}
    assert "pinned: 1 host out (big: not the pinned host wn07)" in str(plan.unplaced["j2"])


def test_explanation_exact_text() -> None:
    hosts = [host("hv01", vcpus=4), host("hv02", state=HostState.DEAD), host("hv03", vcpus=2, rack="r2")]
    s = snap(hosts, [vm("x", "hv01", 2)])
    plan = schedule([req("big", 4, labels={"rack": "r2"})], s, SchedulerPolicy(preemption=False))
    assert str(plan.unplaced["big"]) == (
        "no host for big among 3 hosts: state: 1 host out (hv02: host is dead); "
        "labels: 1 host out (hv01: lacks rack=r2); capacity: 1 host out (hv03: needs 4 vCPU, has 2 free)"
    )
    counts = [(f.name, f.passed, f.failed) for f in plan.unplaced["big"].filters]
    assert counts == [
        ("state", 2, 1),
        ("lease", 2, 0),
        ("pinned", 2, 0),
        ("labels", 1, 1),
        ("anti_affinity", 1, 0),
        ("capacity", 0, 1),
    ]


def test_explanation_memory_reason_and_examples_capped() -> None:
    s = snap([host(f"hv{i}", vcpus=8, mem=1024) for i in range(10)])
    why = schedule([req("m", 1, 4096)], s).unplaced["m"]
    cap = next(f for f in why.filters if f.name == "capacity")
    assert cap.failed == 10 and len(cap.examples) == 3
    assert cap.examples[0] == ("hv0", "needs 4096 MiB, has 1024 MiB free")


def test_no_hosts_at_all() -> None:
    assert str(schedule([req("x")], snap([])).unplaced["x"]).startswith("no host for x among 0 hosts")
