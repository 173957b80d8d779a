"""Failover planning and the capacity reserve over hand-built snapshots (pure: no Redis)."""

from __future__ import annotations

from ha.plan import capacity_reserve, plan_failover
from provisioner.model import InstanceState, Tier
from provisioner.scheduler import SchedulerPolicy
from tests.scheduler.factory import host, snap, vm

POLICY = SchedulerPolicy()


def farm() -> list:  # type: ignore[type-arg]
    return [host("hv1"), host("hv2"), host("hv3")]


def test_dead_hosts_services_go_to_survivors_most_critical_first() -> None:
    insts = [
        vm("wms", "hv1", tier=Tier.NORMAL),
        vm("ce", "hv1", tier=Tier.CRITICAL),
        vm("se", "hv1", tier=Tier.HIGH),
        vm("w1", "hv1"),
        vm("w2", "hv2"),
        vm("gone", "hv1", tier=Tier.CRITICAL, state=InstanceState.GONE),
        vm("stopping", "hv1", tier=Tier.CRITICAL, state=InstanceState.STOPPING),
    ]
    plan = plan_failover(snap(farm(), insts), "hv1", POLICY)
    assert plan.complete
    assert set(plan.placements) == {"ce", "se", "wms"}
    assert set(plan.placements.values()) <= {"hv2", "hv3"}
    assert plan.order == ["ce", "se", "wms"]
    assert plan.workers_lost == ["w1"]  # workers are requeued, not restarted
    assert plan.preemptions == {}


def test_least_loaded_survivor_first() -> None:
    insts = [vm("ce", "hv1", tier=Tier.CRITICAL), vm("w2a", "hv2", vcpus=4), vm("w3", "hv3", vcpus=1)]
    plan = plan_failover(snap(farm(), insts), "hv1", POLICY)
    assert plan.placements == {"ce": "hv3"}


def test_workers_are_preempted_when_survivors_are_full() -> None:
    hosts = [host("hv1", vcpus=4), host("hv2", vcpus=4)]
    insts = [
        vm("ce", "hv1", vcpus=2, tier=Tier.CRITICAL),
        vm("w1", "hv2", vcpus=2),
        vm("w2", "hv2", vcpus=2),
    ]
    plan = plan_failover(snap(hosts, insts), "hv1", POLICY)
    assert plan.placements == {"ce": "hv2"}
    assert len(plan.preemptions) == 1 and set(plan.preemptions) <= {"w1", "w2"}
    assert set(plan.victim_hosts.values()) == {"hv2"}


def test_services_are_never_preempted_for_workers_or_equals() -> None:
    hosts = [host("hv1", vcpus=2), host("hv2", vcpus=2)]
    insts = [vm("ce1", "hv1", vcpus=2, tier=Tier.CRITICAL), vm("ce2", "hv2", vcpus=2, tier=Tier.CRITICAL)]
    plan = plan_failover(snap(hosts, insts), "hv1", POLICY)
    assert not plan.complete and "ce1" in plan.unplaced
    assert plan.preemptions == {}
    assert "no host for ce1" in str(plan.unplaced["ce1"])


def test_anti_affinity_spreads_a_group_over_survivors() -> None:
    insts = [
        vm("ce1", "hv1", tier=Tier.CRITICAL, group="ce"),
        vm("ce2", "hv1", tier=Tier.CRITICAL, group="ce"),
    ]
    plan = plan_failover(snap(farm(), insts), "hv1", POLICY)
    assert sorted(plan.placements.values()) == ["hv2", "hv3"]


def test_start_after_orders_the_batch() -> None:
    insts = [vm("wms", "hv1", tier=Tier.CRITICAL), vm("se", "hv1", tier=Tier.NORMAL)]
    plan = plan_failover(snap(farm(), insts), "hv1", POLICY, start_after={"wms": ("se",)})
    assert plan.order.index("se") < plan.order.index("wms")


def test_reserve_names_the_host_whose_death_leaves_a_critical_service_out() -> None:
    hosts = [host("hv1", vcpus=4), host("hv2", vcpus=4), host("hv3", vcpus=4)]
    fits = [vm("ce", "hv1", vcpus=2, tier=Tier.CRITICAL), vm("se", "hv2", vcpus=2, tier=Tier.CRITICAL)]
    assert capacity_reserve(snap(hosts, fits), POLICY).ok
    big = [
        vm("ce", "hv1", vcpus=4, tier=Tier.CRITICAL),
        vm("se", "hv2", vcpus=4, tier=Tier.CRITICAL),
        vm("wms", "hv3", vcpus=4, tier=Tier.CRITICAL),
    ]
    reserve = capacity_reserve(snap(hosts, big), POLICY)
    assert not reserve.ok
    assert reserve.uncovered == {"hv1": ["ce"], "hv2": ["se"], "hv3": ["wms"]}
    assert "if hv1 dies: no room for ce" in str(reserve)
