"""Host states: every (from, to, operator) move against the table, enforced inside Redis, and
compare-and-set on the state the writer read."""

from __future__ import annotations

import itertools

import pytest

from provisioner.errors import ConflictError, InvalidTransition, NotFoundError
from provisioner.model import HOST_TRANSITIONS, OPERATOR_HOST_TRANSITIONS, Capacity, Host, HostState
from provisioner.state import StateStore

pytestmark = pytest.mark.redis

U, DR, M, S, D, F = (
    HostState.UP,
    HostState.DRAINING,
    HostState.MAINTENANCE,
    HostState.SUSPECT,
    HostState.DEAD,
    HostState.FENCED,
)
# Written out by hand (not derived from the model's table): the contract this test pins down.
AUTOMATIC = {
    U: {DR, M, S, D},
    DR: {U, M, S, D},
    M: {U, DR, S, D},
    S: {U, DR, M, D},
    D: {F},
    F: set(),
}
OPERATOR_ONLY = {D: {U, DR, M}, F: {U, DR, M}}
CASES = list(itertools.product(HostState, HostState, [False, True]))
IDS = [f"{a}->{b}{'-op' if o else ''}" for a, b, o in CASES]


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    return StateStore.from_url(redis_url)


def _host(store: StateStore, state: HostState) -> None:
    store.register_host(Host("hv01", "test:///default", state=state, capacity=Capacity(4, 4096)))


def test_model_table_is_the_contract() -> None:
    assert {k: set(v) for k, v in HOST_TRANSITIONS.items()} == AUTOMATIC
    assert {k: set(v) for k, v in OPERATOR_HOST_TRANSITIONS.items()} == OPERATOR_ONLY


@pytest.mark.parametrize(("cur", "new", "operator"), CASES, ids=IDS)
def test_every_transition(store: StateStore, cur: HostState, new: HostState, operator: bool) -> None:
    _host(store, cur)
    allowed = cur == new or new in AUTOMATIC[cur] or (operator and new in OPERATOR_ONLY.get(cur, set()))
    if allowed:
        assert store.set_host_state("hv01", new, expected=cur, reason="t", operator=operator) is cur
        assert store.require_host("hv01").state is new
        assert store.host_reason("hv01") == "t"
    else:
        with pytest.raises(InvalidTransition, match=f"from {cur.value} to {new.value}"):
            store.set_host_state("hv01", new, expected=cur, reason="t", operator=operator)
        assert store.require_host("hv01").state is cur


def test_stale_read_cannot_undo_dead(store: StateStore) -> None:
    """The reported race: an agent reads suspect, a monitor declares the host dead, the agent writes up."""
    _host(store, S)
    read = store.require_host("hv01").state
    store.set_host_state("hv01", D, expected=S, reason="monitor: lease expired")
    with pytest.raises(ConflictError, match="hv01 is dead, not suspect"):
        store.set_host_state("hv01", U, expected=read, reason="agent reached libvirt again")
    assert store.require_host("hv01").state is D
    assert store.host_reason("hv01") == "monitor: lease expired"
    # Even an operator acts only on what it read.
    with pytest.raises(ConflictError):
        store.set_host_state("hv01", U, expected=S, operator=True)
    store.set_host_state("hv01", U, expected=D, reason="operator rejoin", operator=True)
    assert store.require_host("hv01").state is U


def test_unknown_host(store: StateStore) -> None:
    with pytest.raises(NotFoundError, match="'ghost'"):
        store.set_host_state("ghost", D, expected=U)
    assert store.get_host("ghost") is None


def test_refused_moves_write_no_event(store: StateStore) -> None:
    _host(store, D)
    before = len(store.read_events(count=100))
    with pytest.raises(InvalidTransition):
        store.set_host_state("hv01", U, expected=D)
    assert len(store.read_events(count=100)) == before
