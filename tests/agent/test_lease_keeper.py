"""The lease thread against a real (private) Redis: it survives a read-only Redis (what a Sentinel failover
looks like to a client), learns when its lease was lost or taken, and a second agent cannot take a lease
that is being renewed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.agent.lease import LeaseKeeper, acquire
from provisioner.errors import ConflictError
from provisioner.model import Capacity, Host
from provisioner.state import StateStore
from tests.conftest import wait_until
from tests.redisproc import PrivateRedis, free_port

pytestmark = pytest.mark.redis
TTL = 0.6


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test alone: the tests turn it into a read-only replica and back."""
    server = PrivateRedis(tmp_path).start(timeout_s=10)
    yield server.url
    server.stop()


@pytest.fixture()
def store(own_redis: str) -> StateStore:
    s = StateStore.from_url(own_redis)
    s.register_host(Host("hv1", "test:///default", capacity=Capacity(4, 4096)))
    return s


def _keeper(store: StateStore, token: str = "agent-a", **kw: object) -> LeaseKeeper:
    assert store.acquire_lease("hv1", token, TTL) is None
    k = LeaseKeeper(store, "hv1", token, TTL, **kw)  # type: ignore[arg-type]
    k.start()
    return k


def test_renewal_survives_a_read_only_redis(store: StateStore) -> None:
    """A Sentinel failover demotes the master: writes raise ReadOnlyError.  Today's loop caught only our
    own errors and died silently; the keeper counts, goes on, and reports the gap afterwards."""
    k = _keeper(store)
    try:
        wait_until(lambda: k.stats.renewals >= 2, 5, what="renewals")
        # Demoted: a replica of a master that never answers refuses every write.
        store.r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # type: ignore[no-untyped-call]
        try:
            wait_until(lambda: k.stats.failures >= 3, 10, what="failed renewals to be counted")
            assert k.alive
            assert "read" in k.stats.last_error.lower(), k.stats.last_error
        finally:
            store.r.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        # Renewal resumes; the outage outlasted the TTL, so the agent learns its lease was lost (a gap).
        wait_until(k.lost.is_set, 10, what="the keeper to learn of the gap")
        # The counts reach the host record with the renewals that follow.
        wait_until(lambda: store.lease_health("hv1").losses >= 1, 10, what="the loss on the host record")
        health = store.lease_health("hv1")
        assert health.failures >= 3 and "read" in health.last_error.lower()
        assert store.lease_holder("hv1") == "agent-a" and k.alive
        assert "lease_lost" in [e.kind for e in store.read_events() if e.host == "hv1"]
    finally:
        k.close()


def test_a_lease_taken_by_another_token_is_refused_and_reported(store: StateStore) -> None:
    reasons: list[str] = []
    k = _keeper(store, on_lost=reasons.append)
    try:
        store.r.set(store.keys.lease("hv1"), "agent-b", px=30_000)  # someone took the lease over
        wait_until(k.lost.is_set, 5, what="the keeper to learn its lease was taken")
        assert k.stats.refusals >= 1 and "agent-b" in reasons[0]
        assert store.lease_holder("hv1") == "agent-b"  # never overwritten by the old owner
        wait_until(lambda: k.stats.refusals >= 3, 5, what="more refused renewals")
        assert store.lease_holder("hv1") == "agent-b"
        # Counted every time, reported once per takeover (no event flood).
        assert k.stats.losses == 1 and len(reasons) == 1
        assert [e.kind for e in store.read_events() if e.host == "hv1"].count("lease_lost") == 1
    finally:
        k.close()


def test_a_failing_hook_does_not_stop_renewal(store: StateStore) -> None:
    def broken(why: str) -> None:
        raise RuntimeError("hook bug")

    k = _keeper(store, on_lost=broken)
    try:
        store.r.delete(store.keys.lease("hv1"))  # the lease lapsed
        wait_until(k.lost.is_set, 5, what="the gap to be noticed")
        n = k.stats.renewals
        wait_until(lambda: k.stats.renewals >= n + 2, 5, what="renewals to go on")
        assert k.alive and store.lease_holder("hv1") == "agent-a"
    finally:
        k.close()


def test_second_agent_cannot_take_a_renewed_lease(store: StateStore) -> None:
    k = _keeper(store)
    try:
        with pytest.raises(ConflictError, match="another agent holds its lease"):
            acquire(store, "hv1", "agent-b", TTL, margin_s=0.3)
        assert store.lease_holder("hv1") == "agent-a"
    finally:
        k.close()


def test_a_crashed_agents_lease_is_taken_after_it_expires(store: StateStore) -> None:
    assert store.acquire_lease("hv1", "agent-a", TTL) is None  # and then the agent dies: no renewal
    acquire(store, "hv1", "agent-b", TTL, margin_s=0.3)
    assert store.lease_holder("hv1") == "agent-b"
