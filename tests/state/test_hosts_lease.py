"""Host leases against a real Redis: ownership (acquire, CAS renewal, gaps), Redis's clock, snapshots."""

from __future__ import annotations

import pytest

from provisioner.errors import NotFoundError
from provisioner.model import Capacity, Host
from provisioner.scheduler import PlacementRequest, SchedulerPolicy, schedule
from provisioner.state import StateStore
from provisioner.state.hosts import LeaseHealth, Renewal
from tests.conftest import wait_until

pytestmark = pytest.mark.redis


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    return StateStore.from_url(redis_url)


def hv(name: str = "hv01", last_seen: float = 0.0) -> Host:
    return Host(name, "test:///default", capacity=Capacity(8, 16384), last_seen=last_seen)


def redis_now(store: StateStore) -> float:
    sec, usec = store.r.time()
    return float(sec) + usec / 1e6


def test_acquire_takes_a_free_lease_and_touches_no_record(store: StateStore) -> None:
    assert store.acquire_lease("hv01", "agent-a", 5) is None
    assert store.lease_holder("hv01") == "agent-a"
    assert store.get_host("hv01") is None and store.read_events() == []
    assert store.acquire_lease("hv01", "agent-a", 5) is None  # our own lease: refreshed
    assert store.acquire_lease("hv01", "agent-b", 5) == "agent-a"  # a live holder: refused, named
    assert store.lease_holder("hv01") == "agent-a"


def test_acquire_after_expiry(store: StateStore) -> None:
    store.acquire_lease("hv01", "agent-a", 0.1)
    wait_until(lambda: store.acquire_lease("hv01", "agent-b", 5) is None, 5, what="old lease to expire")
    assert store.lease_holder("hv01") == "agent-b"


def test_renew_is_compare_and_set_on_the_token(store: StateStore) -> None:
    store.register_host(hv())
    assert store.acquire_lease("hv01", "agent-a", 10) is None
    assert store.renew_lease("hv01", "agent-a", 10) == (Renewal.RENEWED, "")
    # A second agent cannot renew (or take) a lease another token holds; nothing is written.
    seen = store.get_host("hv01").last_seen  # type: ignore[union-attr]
    assert store.renew_lease("hv01", "agent-b", 30) == (Renewal.REFUSED, "agent-a")
    assert store.lease_holder("hv01") == "agent-a"
    assert store.lease_ttl_ms("hv01") <= 10_000
    assert store.get_host("hv01").last_seen == seen  # type: ignore[union-attr]


def test_renew_after_expiry_retakes_and_reports_the_gap(store: StateStore) -> None:
    store.register_host(hv())
    store.acquire_lease("hv01", "agent-a", 0.1)
    wait_until(lambda: not store.lease_alive("hv01"), 5, what="lease to expire")
    assert store.renew_lease("hv01", "agent-a", 10) == (Renewal.RETAKEN, "")
    assert store.lease_holder("hv01") == "agent-a"
    assert store.renew_lease("hv01", "agent-a", 10) == (Renewal.RENEWED, "")


def test_renew_unknown_host_writes_nothing(store: StateStore) -> None:
    with pytest.raises(NotFoundError, match="'ghost'"):
        store.renew_lease("ghost", "agent-a", 1)
    assert not store.lease_alive("ghost") and store.get_host("ghost") is None


def test_last_seen_is_redis_time_never_the_agents(store: StateStore) -> None:
    """An agent whose clock is a day off (or that sends 0) cannot make a host look fresh or stale."""
    for bogus in (1.0, redis_now(store) + 86_400):
        store.register_host(hv(last_seen=bogus))
        stored = store.get_host("hv01")
        assert stored is not None and abs(stored.last_seen - redis_now(store)) < 5, bogus
    store.acquire_lease("hv01", "agent-a", 10)
    before = redis_now(store)
    store.renew_lease("hv01", "agent-a", 10)
    seen = store.get_host("hv01").last_seen  # type: ignore[union-attr]
    assert before <= seen <= redis_now(store)


def test_taking_or_handing_over_the_lease_stamps_last_seen(store: StateStore) -> None:
    """A restarted agent's host is judged on the moment its new agent took the lease, not on its
    predecessor's last renewal (seen: a host whose agent restarted slowly declared dead meanwhile)."""
    store.register_host(hv())
    store.r.hset(store.keys.host("hv01"), "last_seen", "1000.0")  # the old agent's last renewal, long ago
    before = redis_now(store)
    assert store.acquire_lease("hv01", "agent-a", 10) is None
    seen = store.get_host("hv01").last_seen  # type: ignore[union-attr]
    assert before <= seen <= redis_now(store)
    store.r.hset(store.keys.host("hv01"), "last_seen", "1000.0")
    assert store.acquire_lease("hv01", "agent-b", 10) == "agent-a"  # refused: the record is not touched
    assert store.get_host("hv01").last_seen == 1000.0  # type: ignore[union-attr]
    before = redis_now(store)
    assert store.handover_lease("hv01", "agent-a", "agent-b", 10) is None
    seen = store.get_host("hv01").last_seen  # type: ignore[union-attr]
    assert before <= seen <= redis_now(store)


def test_lease_health_is_recorded_with_the_renewal(store: StateStore) -> None:
    store.register_host(hv())
    assert store.lease_health("hv01") == LeaseHealth()
    health = LeaseHealth(failures=3, refusals=1, losses=2, last_error="ReadOnlyError: read only replica")
    store.renew_lease("hv01", "agent-a", 10, health)
    assert store.lease_health("hv01") == health


def test_snapshot_reads_lease_liveness_and_placement_skips_dead_leases(store: StateStore) -> None:
    """Reproduced: after `farm down` and `farm up --hosts 2`, VMs went to the old hv3 (state up, no agent)
    and stayed placed forever."""
    for name in ("hv1", "hv2", "hv3"):
        store.register_host(hv(name))
    store.acquire_lease("hv1", "agent-1", 30)
    store.acquire_lease("hv2", "agent-2", 30)
    snap = store.snapshot()
    assert {h.name: h.lease_alive for h in snap.hosts} == {"hv1": True, "hv2": True, "hv3": False}
    # hv3 is the emptiest and the least-loaded weigher would pick it: the lease filter must not.
    store.claim("hv1", "x1", 4, 1024, require_lease=False)
    store.claim("hv2", "x2", 4, 1024, require_lease=False)
    plan = schedule([PlacementRequest("new", 1, 512)], store.snapshot(), SchedulerPolicy())
    assert plan.placements == {"new": "hv1"} or plan.placements == {"new": "hv2"}
    store.drop_lease("hv1")
    store.drop_lease("hv2")
    plan = schedule([PlacementRequest("new", 1, 512)], store.snapshot(), SchedulerPolicy())
    assert plan.placements == {}
    assert "lease: 3 hosts out (hv1: lease expired" in str(plan.unplaced["new"])
