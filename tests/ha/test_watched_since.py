"""The host record's ``watched_since``: stamped from Redis's clock by the state compare-and-set itself on a
move into watch from outside it (rejoin, end of maintenance), so every monitor — a newly elected leader
too — judges a returned host from its return (ha.detection.heard_at).  Every move, one row each."""

from __future__ import annotations

import itertools

import pytest

from provisioner.errors import ConflictError
from provisioner.model import Capacity, Host, HostState, host_transition_allowed
from provisioner.state import StateStore

pytestmark = pytest.mark.redis

# Written out by hand (not derived from the model): the states HA watches.
WATCHED = {HostState.UP, HostState.DRAINING, HostState.SUSPECT}
MOVES = [(a, b) for a, b in itertools.product(HostState, HostState)
         if a is not b and host_transition_allowed(a, b, operator=True)]


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    return StateStore.from_url(redis_url)


def _now(store: StateStore) -> float:
    sec, usec = store.r.time()
    return float(sec) + usec / 1e6


def _host_in(store: StateStore, state: HostState) -> None:
    store.register_host(Host("hv1", "test:///default", state=state, capacity=Capacity(2, 2048)))


@pytest.mark.parametrize(("before", "after"), MOVES, ids=[f"{a}->{b}" for a, b in MOVES])
def test_only_a_move_into_watch_from_outside_stamps_watched_since(
    store: StateStore, before: HostState, after: HostState
) -> None:
    _host_in(store, before)
    t0 = _now(store)
    store.set_host_state("hv1", after, expected=before, reason="test", operator=True)
    t1 = _now(store)
    got = store.require_host("hv1").watched_since
    if before not in WATCHED and after in WATCHED:
        assert t0 <= got <= t1
    else:
        assert got == 0.0


def test_a_later_return_restamps_and_moves_within_watch_keep_it(store: StateStore) -> None:
    _host_in(store, HostState.MAINTENANCE)
    store.set_host_state("hv1", HostState.UP, expected=HostState.MAINTENANCE, operator=True)
    first = store.require_host("hv1").watched_since
    store.set_host_state("hv1", HostState.DRAINING, expected=HostState.UP, operator=True)
    store.set_host_state("hv1", HostState.UP, expected=HostState.DRAINING, operator=True)
    assert store.require_host("hv1").watched_since == first  # never left watch: still its return
    store.set_host_state("hv1", HostState.DEAD, expected=HostState.UP)
    store.set_host_state("hv1", HostState.FENCED, expected=HostState.DEAD)
    t0 = _now(store)
    store.set_host_state("hv1", HostState.UP, expected=HostState.FENCED, reason="rejoin", operator=True)
    assert store.require_host("hv1").watched_since >= t0 > first
    # A re-registration (an agent restarting) refreshes uri/capacity, never the return.
    _host_in(store, HostState.UP)
    assert store.require_host("hv1").watched_since >= t0


def test_a_refused_move_stamps_nothing(store: StateStore) -> None:
    _host_in(store, HostState.FENCED)
    with pytest.raises(ConflictError):  # read as dead, but it is fenced: stale
        store.set_host_state("hv1", HostState.UP, expected=HostState.DEAD, operator=True)
    with pytest.raises(ConflictError):  # the table: only an operator brings a fenced host back
        store.set_host_state("hv1", HostState.UP, expected=HostState.FENCED)
    store.r.set(f"{store.keys.prefix}:ha:leader", "mon-1|7")
    with pytest.raises(ConflictError):  # a deposed monitor's fence
        store.set_host_state("hv1", HostState.UP, expected=HostState.FENCED, operator=True, fence=6)
    assert store.require_host("hv1").state is HostState.FENCED
    assert store.require_host("hv1").watched_since == 0.0
    store.set_host_state("hv1", HostState.UP, expected=HostState.FENCED, operator=True, fence=7)
    assert store.require_host("hv1").watched_since > 0.0
