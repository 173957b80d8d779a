"""create_instance's admission gate: a closed (or absent) circuit breaker costs no extra round trip; one that
is not closed writes nothing and hands the decision back; a job's existing VM is never refused by it."""

from __future__ import annotations

import pytest

from provisioner.idempotency import job_key
from provisioner.model import Instance, Role
from provisioner.state import StateStore
from provisioner.state.instances import GateNotClosed

pytestmark = pytest.mark.redis
GATE = "dynvm:breaker:cms-wn:1"


def _inst(iid: str) -> Instance:
    return Instance(id=iid, role=Role.WORKER, image="cms-wn:1", vcpus=1, memory_mib=512, vo="cms")


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    s = StateStore.from_url(redis_url)
    s.r.delete(GATE)
    return s


@pytest.mark.parametrize("fields", [None, {"state": "closed", "failures": "2"}])
def test_absent_or_closed_breaker_lets_it_through(store: StateStore, fields: dict[str, str] | None) -> None:
    if fields:
        store.r.hset(GATE, mapping=dict(fields))  # type: ignore[arg-type]
    _, created = store.create_instance(_inst("g1"), gate=GATE)
    assert created and store.get_instance("g1") is not None


@pytest.mark.parametrize("state", ["open", "half_open"])
def test_a_breaker_not_closed_writes_nothing(store: StateStore, state: str) -> None:
    store.r.hset(GATE, mapping={"state": state})
    with pytest.raises(GateNotClosed, match=state):
        store.create_instance(_inst("g2"), idempotency_key=job_key("bob", "9", 0), gate=GATE)
    assert store.get_instance("g2") is None
    assert store.instance_for_key(job_key("bob", "9", 0)) is None
    assert not store.r.sismember("dynvm:insts", "g2")


def test_an_idempotent_hit_wins_over_an_open_breaker(store: StateStore) -> None:
    key = job_key("carol", "5", 0)
    first, _ = store.create_instance(_inst("g3"), idempotency_key=key, gate=GATE)
    store.r.hset(GATE, mapping={"state": "open"})
    again, created = store.create_instance(_inst("g4"), idempotency_key=key, gate=GATE)
    assert (again.id, created) == (first.id, False)


def test_pick_up_marks_on_redis_clock_and_reads_the_record(store: StateStore) -> None:
    store.create_instance(_inst("g5"))
    t0 = store.redis_time()
    inst = store.pick_up("g5")
    assert inst is not None and inst.id == "g5"
    picked = store.picked_at(["g5"])["g5"]
    assert picked is not None and t0 <= picked <= store.redis_time()
    assert store.pick_up("nope") is None
