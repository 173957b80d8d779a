"""Leader lease with fencing tokens and recovery records, on the real Redis."""

from __future__ import annotations

import pytest
import redis

from ha.leader import LeaderLease
from ha.recovery import FencedOut, RecoveryStore, Step
from provisioner.errors import ConflictError
from tests.conftest import wait_until

pytestmark = pytest.mark.redis


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def test_one_leader_and_a_standby_takes_over_after_expiry(redis_url: str) -> None:
    r = client(redis_url)
    a = LeaderLease(r, "t", "mon-a", ttl_s=0.3)
    b = LeaderLease(r, "t", "mon-b", ttl_s=0.3)
    la = a.acquire_or_renew()
    lb = b.acquire_or_renew()
    assert la.leading and la.leader == "mon-a"
    assert not lb.leading and lb.leader == "mon-a"
    assert a.acquire_or_renew().fence == la.fence  # renewal keeps the fence
    # a stops renewing: b takes over within one lease period, with a higher fence
    took = wait_until(lambda: b.acquire_or_renew().leading or None, timeout=3, what="standby takeover")
    assert took
    lb2 = b.current()
    assert lb2 is not None and lb2.leader == "mon-b" and lb2.fence > la.fence


def test_a_deposed_leaders_late_writes_are_refused(redis_url: str) -> None:
    r = client(redis_url)
    a = LeaderLease(r, "t", "mon-a", ttl_s=0.2)
    b = LeaderLease(r, "t", "mon-b", ttl_s=5)
    recs = RecoveryStore(r, "t")
    fa = a.acquire_or_renew().fence
    assert recs.open("hv1", fa, "lease silent 1.2 s")
    fb = wait_until(lambda: b.acquire_or_renew().fence or None, timeout=3, what="takeover")
    with pytest.raises(FencedOut):
        recs.advance("hv1", fa, Step.OPEN, Step.FENCED)
    with pytest.raises(FencedOut):
        recs.open("hv2", fa, "late")
    assert recs.get("hv2") is None
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.OPEN
    # the new leader resumes the open record where it stood
    assert [x.host for x in recs.open_records()] == ["hv1"]
    recs.advance("hv1", fb, Step.OPEN, Step.FENCED, {"how": "self-fence deadline"})
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.FENCED and rec.fence == fb
    assert rec.detail == {"how": "self-fence deadline"} and rec.times["fenced"] >= rec.times["open"]


def test_steps_are_compare_and_set_and_follow_the_table(redis_url: str) -> None:
    r = client(redis_url)
    lease = LeaderLease(r, "t", "mon-a", ttl_s=5)
    f = lease.acquire_or_renew().fence
    recs = RecoveryStore(r, "t")
    assert recs.open("hv1", f, "dead")
    assert not recs.open("hv1", f, "dead again")  # duplicate death event suppressed
    with pytest.raises(ConflictError, match="cannot go from open to started"):
        recs.advance("hv1", f, Step.OPEN, Step.STARTED)
    recs.advance("hv1", f, Step.OPEN, Step.FENCED)
    with pytest.raises(ConflictError, match="is fenced, expected open"):
        recs.advance("hv1", f, Step.OPEN, Step.FENCED)  # a second worker acting on a stale read
    for cur, nxt in [
        (Step.FENCED, Step.PLANNED),
        (Step.PLANNED, Step.STARTED),
        (Step.STARTED, Step.PLANNED),  # a start failed: re-plan
        (Step.PLANNED, Step.STARTED),
        (Step.STARTED, Step.CONFIRMED),
        (Step.CONFIRMED, Step.CLOSED),
    ]:
        recs.advance("hv1", f, cur, nxt)
    assert recs.open_records() == []
    assert recs.open("hv1", f, "died again later")  # a closed record does not block the next death
    with pytest.raises(ConflictError, match="no recovery record"):
        recs.advance("hv9", f, Step.OPEN, Step.FENCED)


@pytest.mark.parametrize("cur", list(Step))
def test_every_step_transition_matches_the_table(redis_url: str, cur: Step) -> None:
    from ha.recovery import STEP_TRANSITIONS

    r = client(redis_url)
    f = LeaderLease(r, "t", "mon-a", ttl_s=5).acquire_or_renew().fence
    recs = RecoveryStore(r, "t")
    for new in Step:
        r.delete(recs.key("hv1"))
        r.hset(recs.key("hv1"), mapping={"host": "hv1", "step": cur.value, "fence": f})
        if new in STEP_TRANSITIONS[cur]:
            recs.advance("hv1", f, cur, new)
            rec = recs.get("hv1")
            assert rec is not None and rec.step is new
        else:
            with pytest.raises(ConflictError):
                recs.advance("hv1", f, cur, new)
            rec = recs.get("hv1")
            assert rec is not None and rec.step is cur


def test_host_state_writes_carry_the_fence(redis_url: str) -> None:
    from provisioner.model import Capacity, Host, HostState
    from provisioner.state.store import StateStore

    store = StateStore(redis_url, prefix="t")
    store.register_host(Host("hv1", "test:///default", HostState.UP, Capacity(4, 4096)))
    r = client(redis_url)
    a = LeaderLease(r, "t", "mon-a", ttl_s=0.2)
    fa = a.acquire_or_renew().fence
    b = LeaderLease(r, "t", "mon-b", ttl_s=5)
    fb = wait_until(lambda: b.acquire_or_renew().fence or None, timeout=3, what="takeover")
    with pytest.raises(ConflictError, match="no longer leads"):
        store.set_host_state("hv1", HostState.DEAD, expected=HostState.UP, fence=fa)
    assert store.require_host("hv1").state is HostState.UP
    store.set_host_state("hv1", HostState.DEAD, expected=HostState.UP, fence=fb)
    assert store.require_host("hv1").state is HostState.DEAD
