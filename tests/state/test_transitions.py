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
    with pytest.raises(ConflictError, match="changed since it was read: is requested, expected booting"):
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


# --- compare-and-set on state, host and placement epoch -------------------------------------------------


def _placed(store: StateStore, iid: str = "i1", host: str = "hv01") -> Instance:
    store.register_host(Host(host, "test:///default", capacity=Capacity(8, 8192)))
    store.renew_lease(host, "agent-token", 60)  # claims only go to hosts whose agent is alive
    store.create_instance(Instance(iid, Role.WORKER, "img:1", 1, 256))
    assert store.claim(host, iid, 1, 256)
    return store.transition(iid, InstanceState.PLACED, InstanceState.REQUESTED, expected_host=None, host=host)


def test_the_epoch_goes_up_on_every_placement_and_host_change_only(redis_url: str) -> None:
    store = StateStore(redis_url)
    store.create_instance(Instance("i1", Role.WORKER, "img:1", 1, 256, host="hv01"))  # pinned
    assert store.require_instance("i1").epoch == 0
    placed = store.transition("i1", InstanceState.PLACED, bump_epoch=True)  # same host: asked to bump
    assert placed.epoch == 1
    assert store.transition_from(placed, InstanceState.BOOTING).epoch == 1  # same placement
    store.transition("i1", InstanceState.READY)
    moving = store.transition("i1", InstanceState.MIGRATING, bump_epoch=True)
    assert moving.epoch == 2
    moved = store.transition_from(moving, InstanceState.READY, host="hv02")  # host changed: bumped
    assert (moved.host, moved.epoch) == ("hv02", 3)
    assert store.update_instance_fields("i1", ip="10.0.0.9").epoch == 3
    with pytest.raises(Exception, match="'epoch' cannot be updated"):
        store.update_instance_fields("i1", epoch=0)


@pytest.mark.parametrize("stale", ["state", "host", "epoch"])
def test_a_stale_read_is_refused_and_names_what_differed(redis_url: str, stale: str) -> None:
    store = StateStore(redis_url)
    read = _placed(store)
    read = store.transition_from(read, InstanceState.BOOTING)
    read = store.transition_from(read, InstanceState.READY)
    assert (read.state, read.host, read.epoch) == (InstanceState.READY, "hv01", 1)
    # Something moves the record on after our read, changing exactly one of the three.
    if stale == "state":
        store.transition_from(read, InstanceState.DRAINING)
        want = "is draining, expected ready"
    elif stale == "host":
        store.update_instance_fields("i1", host="hv02")
        want = "host is hv02, expected hv01"
    else:  # a new placement on the same host: only the epoch tells the reads apart
        now = store.transition_from(read, InstanceState.LOST)
        now = store.transition_from(now, InstanceState.REQUESTED)
        assert store.claim("hv01", "i1", 1, 256)
        now = store.transition_from(now, InstanceState.PLACED, bump_epoch=True)
        now = store.transition_from(now, InstanceState.BOOTING)
        store.transition_from(now, InstanceState.READY)
        want = "epoch is 2, expected 1"
    before = store.require_instance("i1")
    with pytest.raises(ConflictError, match=want) as err:
        store.transition_from(read, InstanceState.LOST, reason="decided on the old read")
    assert "changed since it was read" in str(err.value) and "(wanted lost)" in str(err.value)
    after = store.require_instance("i1")
    assert after == before  # nothing written: no state, no reason, no claim given back
    assert "i1" in store.claims_on("hv01")


def test_a_migration_lands_and_frees_its_source_in_one_step(redis_url: str) -> None:
    store = StateStore(redis_url)
    read = _placed(store, host="hv01")
    store.register_host(Host("hv02", "test:///default", capacity=Capacity(8, 8192)))
    store.renew_lease("hv02", "agent-token", 60)
    ready = store.transition_from(store.transition_from(read, InstanceState.BOOTING), InstanceState.READY)
    moving = store.transition_from(ready, InstanceState.MIGRATING)
    assert store.claim("hv02", "i1", 1, 256)
    with pytest.raises(ConflictError):  # a landing decided on a stale read frees nothing
        store.transition_from(ready, InstanceState.READY, host="hv02", release_on="hv01")
    assert "i1" in store.claims_on("hv01")
    landed = store.transition_from(moving, InstanceState.READY, host="hv02", release_on="hv01")
    assert (landed.host, landed.epoch) == ("hv02", moving.epoch + 1)
    assert "i1" not in store.claims_on("hv01") and "i1" in store.claims_on("hv02")
    assert store.get_host("hv01").used_vcpus == 0  # type: ignore[union-attr]
    assert store.get_host("hv02").used_vcpus == 1  # type: ignore[union-attr]


def test_expected_host_none_means_not_placed(redis_url: str) -> None:
    store = StateStore(redis_url)
    store.create_instance(Instance("i1", Role.WORKER, "img:1", 1, 256, host="hv01"))
    with pytest.raises(ConflictError, match="host is hv01, expected -"):
        store.transition("i1", InstanceState.GONE, InstanceState.REQUESTED, expected_host=None)
    store.create_instance(Instance("i2", Role.WORKER, "img:1", 1, 256))
    assert store.transition("i2", InstanceState.GONE, expected_host=None, expected_epoch=0).state is (
        InstanceState.GONE
    )


def test_of_two_racers_on_one_read_exactly_one_wins(redis_url: str) -> None:
    """Many threads decide on the same read (migrate, mark lost, stop); one applies, the rest conflict."""
    import threading

    store = StateStore(redis_url)
    read = _placed(store)
    read = store.transition_from(store.transition_from(read, InstanceState.BOOTING), InstanceState.READY)
    targets = [InstanceState.MIGRATING, InstanceState.LOST, InstanceState.STOPPING, InstanceState.DRAINING]
    wins: list[InstanceState] = []
    conflicts: list[str] = []
    go = threading.Barrier(16)

    def racer(n: int) -> None:
        go.wait()
        try:
            wins.append(store.transition_from(read, targets[n % 4], bump_epoch=n % 2 == 0).state)
        except ConflictError as err:
            conflicts.append(str(err))

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(conflicts) == 15
    assert store.require_instance("i1").state is wins[0]


def test_every_production_transition_passes_what_it_read() -> None:
    """No transition outside tests is applied blind: each one goes through ``transition_from`` or passes
    the expected state, host and epoch (the invariant "compare-and-set everywhere", DESIGN.md)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    blind = []
    paths = [p for pkg in ("provisioner", "ha", "batch_hooks") for p in root.glob(f"{pkg}/**/*.py")]
    assert len(paths) > 50
    for path in paths:
        if path.name == "instances.py" and path.parent.name == "state":
            continue  # the store itself
        for node in ast.walk(ast.parse(path.read_text())):
            is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if is_call and node.func.attr == "transition":  # type: ignore[attr-defined]
                given = {k.arg for k in node.keywords}  # type: ignore[attr-defined]
                has_state = len(node.args) >= 3 or "expected" in given  # type: ignore[attr-defined]
                if not (has_state and {"expected_host", "expected_epoch"} <= given):
                    blind.append(f"{path.relative_to(root)}:{node.lineno}")  # type: ignore[attr-defined]
    assert blind == [], f"transitions without state+host+epoch compare-and-set: {blind}"
