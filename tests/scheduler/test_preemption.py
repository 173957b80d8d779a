"""Preemption: only strictly lower tiers, pool before worker before services, the fewest victims."""

from __future__ import annotations

import pytest

from provisioner.model import InstanceState, Tier
from provisioner.scheduler import SchedulerPolicy, schedule
from tests.scheduler.factory import host, req, snap, vm


def test_preempts_lowest_tier_first() -> None:
    s = snap([host("a", vcpus=4)], [vm("w", "a", 2, tier=Tier.WORKER), vm("p", "a", 2, tier=Tier.POOL)])
    plan = schedule([req("ce", 2, tier=Tier.CRITICAL)], s)
    assert plan.placements == {"ce": "a"}
    assert list(plan.preemptions) == ["p"]
    assert plan.victim_hosts == {"p": "a"}
    assert "to make room for ce (critical)" in plan.preemptions["p"]


def test_fewest_victims_within_a_tier() -> None:
    pool = [vm(f"small{i}", "a", 1, tier=Tier.POOL) for i in range(4)] + [vm("big", "a", 4, tier=Tier.POOL)]
    s = snap([host("a", vcpus=8)], pool)
    plan = schedule([req("svc", 4, tier=Tier.NORMAL)], s)
    assert list(plan.preemptions) == ["big"]


def test_prefers_host_needing_only_pool_victims() -> None:
    s = snap(
        [host("a", vcpus=2), host("b", vcpus=2)],
        [
            vm("wa", "a", 2, tier=Tier.WORKER),
            vm("pb1", "b", 1, tier=Tier.POOL),
            vm("pb2", "b", 1, tier=Tier.POOL),
        ],
    )
    plan = schedule([req("svc", 2, tier=Tier.HIGH)], s)
    assert plan.placements == {"svc": "b"}
    assert set(plan.preemptions) == {"pb1", "pb2"}


def test_mixed_tiers_spare_the_higher_victim_when_possible() -> None:
    # Full host, need 3: pool p1 + one worker beats two workers.
    s = snap(
        [host("a", vcpus=5)],
        [
            vm("p1", "a", 1, tier=Tier.POOL),
            vm("w1", "a", 2, tier=Tier.WORKER),
            vm("w2", "a", 2, tier=Tier.WORKER),
        ],
    )
    plan = schedule([req("svc", 3, tier=Tier.NORMAL)], s)
    assert set(plan.preemptions) == {"p1", "w1"}


def test_unneeded_pool_victim_is_spared() -> None:
    # 1 free, need 3: one worker (2) is enough; preempting the pool VM as well would be waste.
    s = snap(
        [host("a", vcpus=6)],
        [
            vm("p1", "a", 1, tier=Tier.POOL),
            vm("w1", "a", 2, tier=Tier.WORKER),
            vm("w2", "a", 2, tier=Tier.WORKER),
        ],
    )
    plan = schedule([req("svc", 3, tier=Tier.NORMAL)], s)
    assert set(plan.preemptions) == {"w1"}


@pytest.mark.parametrize("tier", [Tier.POOL, Tier.WORKER, Tier.NORMAL, Tier.HIGH, Tier.CRITICAL])
def test_never_preempts_equal_or_higher_tier(tier: Tier) -> None:
    s = snap([host("a", vcpus=2)], [vm("x", "a", 2, tier=tier)])
    plan = schedule([req("n", 2, tier=tier)], s)
    assert plan.preemptions == {} and "n" in plan.unplaced


def test_pool_request_preempts_nothing() -> None:
    s = snap([host("a", vcpus=2)], [vm("x", "a", 2, tier=Tier.POOL)])
    assert schedule([req("p", 2, tier=Tier.POOL)], s).preemptions == {}


def test_normal_service_preempts_worker_but_not_high() -> None:
    s = snap([host("a", vcpus=4)], [vm("h", "a", 2, tier=Tier.HIGH), vm("w", "a", 2, tier=Tier.WORKER)])
    plan = schedule([req("n", 4, tier=Tier.NORMAL)], s)
    assert plan.preemptions == {} and "n" in plan.unplaced
    assert "preempting tiers below normal would not make room either" in str(plan.unplaced["n"])


def test_preemption_respects_other_filters() -> None:
    s = snap(
        [host("a", vcpus=2, rack="r1"), host("b", vcpus=2, rack="r2")],
        [vm("pa", "a", 2, tier=Tier.POOL), vm("pb", "b", 2, tier=Tier.POOL)],
    )
    plan = schedule([req("ce", 2, tier=Tier.CRITICAL, labels={"rack": "r2"})], s)
    assert plan.placements == {"ce": "b"} and list(plan.preemptions) == ["pb"]


def test_stopping_instances_are_not_victims() -> None:
    s = snap([host("a", vcpus=2)], [vm("x", "a", 2, tier=Tier.POOL, state=InstanceState.STOPPING)])
    assert schedule([req("ce", 2, tier=Tier.CRITICAL)], s).preemptions == {}


def test_preemption_can_be_disabled() -> None:
    s = snap([host("a", vcpus=2)], [vm("x", "a", 2, tier=Tier.POOL)])
    plan = schedule([req("ce", 2, tier=Tier.CRITICAL)], s, SchedulerPolicy(preemption=False))
    assert plan.preemptions == {} and "ce" in plan.unplaced


def test_a_victim_is_preempted_once_in_a_batch() -> None:
    s = snap([host("a", vcpus=4)], [vm("p", "a", 4, tier=Tier.POOL)])
    plan = schedule([req("s1", 2, tier=Tier.HIGH), req("s2", 2, tier=Tier.HIGH)], s)
    assert plan.placements == {"s1": "a", "s2": "a"}
    assert list(plan.preemptions) == ["p"]


def test_requests_in_the_batch_are_not_victims() -> None:
    # "w" is being re-placed in this batch; it must not be chosen as the victim of "ce".
    s = snap([host("a", vcpus=2)], [vm("w", "a", 2, tier=Tier.WORKER)])
    plan = schedule([req("ce", 2, tier=Tier.CRITICAL), req("w", 2, tier=Tier.WORKER)], s)
    assert "w" not in plan.preemptions


def test_preempted_group_member_frees_its_quota() -> None:
    s = snap([host("a", vcpus=2)], [vm("p", "a", 2, tier=Tier.POOL, vo="cms")])
    policy = SchedulerPolicy(vo_quotas={"cms": (2, None)})
    plan = schedule([req("w", 2, tier=Tier.WORKER, vo="cms")], s, policy)
    # The quota is checked before preemption: cms is at its limit, so nothing is preempted.
    assert plan.preemptions == {} and "quota" in str(plan.unplaced["w"])
