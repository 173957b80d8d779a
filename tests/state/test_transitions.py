"""Every pair of lifecycle states against provisioner.model.TRANSITIONS, enforced inside Redis."""

from __future__ import annotations

import itertools

import pytest

from provisioner.errors import ConflictError, InvalidTransition, NotFoundError
from provisioner.model import TRANSITIONS, Capacity, Host, Instance, InstanceState, Role
from provisioner.state import StateStore

pytestmark = pytest.mark.redis
PAIRS = list(itertools.product(InstanceState, InstanceState))


def _put(store: StateStore, state: InstanceState) -> None:
    # Write the starting state directly: reaching every state by legal steps is not the point here.
    store.create_instance(Instance("i1", Role.WORKER, "img:1", 1, 512, state=state, host="hv01"))


@pytest.fixture(scope="module")
def module_store(redis_server: str) -> StateStore:
    return StateStore(redis_server, prefix="transitions")


@pytest.mark.parametrize(("cur", "new"), PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_transition_table(module_store: StateStore, cur: InstanceState, new: InstanceState) -> None:
    store = module_store
    store.delete_instance("i1")
    _put(store, cur)
    allowed = new == cur or new in TRANSITIONS[cur]
    if allowed:
        out = store.transition("i1", new, reason="test")
        assert out.state is new and out.reason == "test"
        assert [i.id for i in store.list_instances(state=new)] == ["i1"]
        if new != cur:
            assert store.list_instances(state=cur) == []
    else:
        with pytest.raises(InvalidTransition, match=f"from {cur.value} to {new.value}"):
            store.transition("i1", new, reason="test")
        after = store.get_instance("i1")
        assert after is not None and after.state is cur and after.reason == ""


def test_expected_state_mismatch_is_a_conflict(redis_url: str) -> None:
    store = StateStore(redis_url)
    _put(store, InstanceState.REQUESTED)
    with pytest.raises(ConflictError, match="is requested, expected booting"):
        store.transition("i1", InstanceState.READY, expected=InstanceState.BOOTING)
    with pytest.raises(NotFoundError):
        store.transition("nope", InstanceState.READY)


@pytest.mark.parametrize("final", [InstanceState.GONE, InstanceState.FAILED, InstanceState.LOST])
def test_leaving_claiming_states_releases_the_claim(redis_url: str, final: InstanceState) -> None:
    store = StateStore(redis_url)
    store.register_host(Host("hv01", "test:///default", capacity=Capacity(4, 4096)))
    store.create_instance(Instance("i1", Role.WORKER, "img:1", 2, 1024))
    assert store.claim("hv01", "i1", 2, 1024, require_lease=False)
    store.transition("i1", InstanceState.PLACED, host="hv01")
    store.transition("i1", InstanceState.BOOTING)
    assert store.get_host("hv01").used_vcpus == 2  # type: ignore[union-attr]
    store.transition("i1", InstanceState.STOPPING if final is InstanceState.GONE else final)
    if final is InstanceState.GONE:
        assert store.get_host("hv01").used_vcpus == 2  # type: ignore[union-attr]  # stopping still holds it
        store.transition("i1", final)
    assert store.get_host("hv01").used_vcpus == 0  # type: ignore[union-attr]
    assert store.claims_on("hv01") == {}
