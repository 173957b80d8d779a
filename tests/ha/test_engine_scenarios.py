"""Failover scenarios: the real engine and recovery records (real Redis) over a stateful fake world; each
scenario's log is compared with the expected log in tests/data/ha/ (pve-ha-manager's log.expect idea).

Regenerate an expected log after a deliberate change with DYNVM_UPDATE_EXPECT=1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from ha.detection import Timing
from ha.engine import Engine, FenceResult, Settings
from ha.leader import LeaderLease
from ha.recovery import FencedOut, RecoveryStore, Step
from provisioner.model import InstanceState, Tier
from provisioner.scheduler import SchedulerPolicy
from tests.ha.fakeworld import FakeWorld
from tests.scheduler.factory import host, vm

pytestmark = pytest.mark.redis
DATA = Path(__file__).resolve().parents[1] / "data" / "ha"
CRIT = Timing(lease_ttl_s=0.5, dead_after_s=0.9, samples=2)
SETTINGS = Settings(storm_share=0.5, safety_margin_s=0.3, watchdog_s=1.0)
ROUND_S = 0.2


def world() -> FakeWorld:
    return FakeWorld(
        [host("hv1"), host("hv2"), host("hv3")],
        [
            vm("wms", "hv1", tier=Tier.NORMAL),
            vm("ce", "hv1", tier=Tier.CRITICAL),
            vm("se", "hv1", tier=Tier.HIGH),
            vm("w1", "hv1"),
            vm("w2", "hv2", vcpus=4),
            vm("w3", "hv3"),
        ],
        CRIT,
    )


def run(w: FakeWorld, engine: Engine, fence: int, rounds: int, renewing: set[str]) -> None:
    for _ in range(rounds):
        w.advance(ROUND_S, renewing)
        engine.round(fence)


def setup(redis_url: str, w: FakeWorld, member: str = "mon-a") -> tuple[Engine, int, RecoveryStore]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    fence = LeaderLease(r, "s", member, ttl_s=30).acquire_or_renew().fence
    recs = RecoveryStore(r, "s")
    return Engine(w, recs, SchedulerPolicy(), SETTINGS), fence, recs


def check_log(name: str, log: list[str]) -> None:
    path = DATA / f"{name}.log.expect"
    text = "\n".join(log) + "\n"
    if os.environ.get("DYNVM_UPDATE_EXPECT") == "1":
        path.write_text(text)
    assert text == path.read_text()


def test_host_death_services_back_on_survivors_in_priority_order(redis_url: str) -> None:
    w = world()
    engine, fence, recs = setup(redis_url, w)
    run(w, engine, fence, 3, {"hv1", "hv2", "hv3"})
    assert w.log == []  # healthy rounds leave no trace
    run(w, engine, fence, 16, {"hv2", "hv3"})  # hv1 dies
    check_log("host_death", w.log)
    assert [iid for iid, _ in w.starts] == ["ce", "se", "wms"]
    assert {w.inst[i].state for i in ("ce", "se", "wms")} == {InstanceState.READY}
    assert all(w.inst[i].host in ("hv2", "hv3") for i in ("ce", "se", "wms"))
    assert w.inst["w1"].state is InstanceState.LOST
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.CLOSED and rec.detail["ready"] == ["ce", "se", "wms"]


def test_a_host_late_once_is_not_failed_over(redis_url: str) -> None:
    w = world()
    engine, fence, recs = setup(redis_url, w)
    run(w, engine, fence, 5, {"hv2", "hv3"})  # silent 1.0 s: one observation past 0.9 s
    run(w, engine, fence, 10, {"hv1", "hv2", "hv3"})
    assert w.log == [] and recs.get("hv1") is None


def test_half_the_hosts_dying_at_once_holds_for_an_operator(redis_url: str) -> None:
    w = world()
    engine, fence, recs = setup(redis_url, w)
    run(w, engine, fence, 16, {"hv3"})
    check_log("storm", w.log)
    assert w.starts == [] and recs.open_records() == []
    assert w.paused() is not None and "hv1, hv2" in (w.paused() or "")


def test_a_failed_fence_command_blocks_the_restart(redis_url: str) -> None:
    w = world()
    w.fence_results["hv1"] = FenceResult.FAILED
    engine, fence, recs = setup(redis_url, w)
    run(w, engine, fence, 20, {"hv2", "hv3"})
    assert w.starts == []
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.OPEN
    w.fence_results["hv1"] = FenceResult.OK
    run(w, engine, fence, 3, {"hv2", "hv3"})
    assert [iid for iid, _ in w.starts] == ["ce", "se", "wms"]


def test_standby_finishes_a_failover_its_deposed_leader_began(redis_url: str) -> None:
    w = world()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    lease_a = LeaderLease(r, "s", "mon-a", ttl_s=30)
    fa = lease_a.acquire_or_renew().fence
    recs = RecoveryStore(r, "s")
    a = Engine(w, recs, SchedulerPolicy(), SETTINGS)
    run(w, a, fa, 3, {"hv1", "hv2", "hv3"})
    # hv1 dies; a declares it dead, fences it, commits the plan and crashes before sending the boots
    w.crash_on_start = True
    with pytest.raises(RuntimeError, match="crashed"):
        run(w, a, fa, 30, {"hv2", "hv3"})
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.PLANNED and w.starts == []
    w.crash_on_start = False
    assert lease_a.resign(fa)
    b_lease = LeaderLease(r, "s", "mon-b", ttl_s=30)
    fb = b_lease.acquire_or_renew().fence
    b = Engine(w, recs, SchedulerPolicy(), SETTINGS)
    w.advance(ROUND_S, {"hv2", "hv3"})
    with pytest.raises(FencedOut):  # a wakes up first: its boots are sent, its step write is refused
        a.round(fa)
    run(w, b, fb, 3, {"hv2", "hv3"})  # b resumes the record at PLANNED
    assert sorted(iid for iid, _ in w.starts) == ["ce", "se", "wms"]  # each VM started once, on one host
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.CLOSED and rec.fence == fb


def test_a_failed_start_is_reported_and_the_rest_confirmed(redis_url: str) -> None:
    w = world()
    w.boot_fails.add("se")
    engine, fence, recs = setup(redis_url, w)
    run(w, engine, fence, 16, {"hv2", "hv3"})
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.CLOSED
    assert rec.detail["ready"] == ["ce", "wms"] and rec.detail["failed"] == ["se"]


def test_a_host_cut_off_from_redis_only_is_not_failed_over(redis_url: str) -> None:
    """Its peers still hear it: its agent paused and keeps its VMs, so restarting them would run them twice.
    When the peers stop hearing it too, it is a death like any other."""
    w = world()
    w.heard.add("hv1")
    engine, fence, recs = setup(redis_url, w)
    run(w, engine, fence, 20, {"hv2", "hv3"})
    assert w.starts == [] and recs.get("hv1") is None
    assert w.hostrec["hv1"].state.value == "up"
    w.heard.clear()
    run(w, engine, fence, 6, {"hv2", "hv3"})
    assert [iid for iid, _ in w.starts] == ["ce", "se", "wms"]


def test_heard_again_after_being_declared_dead_blocks_the_restart(redis_url: str) -> None:
    w = world()
    engine, fence, recs = setup(redis_url, w)
    for _ in range(30):
        w.advance(ROUND_S, {"hv2", "hv3"})
        engine.round(fence)
        rec = recs.get("hv1")
        if rec is not None:
            break
    assert rec is not None and rec.step is Step.OPEN
    w.heard.add("hv1")  # its peers hear it again before the fence deadline: only Redis was lost
    run(w, engine, fence, 10, {"hv2", "hv3"})
    assert w.starts == []
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.OPEN
