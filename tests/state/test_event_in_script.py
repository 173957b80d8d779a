"""Events written by the state-changing script itself (NewEvent): in the same atomic step as the change,
never for a change that was refused, and with the instance's waiters woken when asked."""

from __future__ import annotations

import pytest

from provisioner.errors import ConflictError
from provisioner.model import Instance, InstanceState, Role
from provisioner.state import NewEvent, StateStore

pytestmark = pytest.mark.redis


def _inst(iid: str) -> Instance:
    return Instance(id=iid, role=Role.WORKER, image="cms-wn:1", vcpus=1, memory_mib=512, vo="cms")


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    s = StateStore.from_url(redis_url, prefix="evscript")
    for k in s.r.scan_iter("evscript:*"):
        s.r.delete(k)
    return s


def _kinds(store: StateStore, iid: str) -> list[str]:
    return [e.kind for e in store.read_events(count=1000) if e.instance == iid]


def test_create_writes_its_event_once(store: StateStore) -> None:
    ev = NewEvent("requested", "cms-wn:1 for cms")
    first, created = store.create_instance(_inst("e1"), idempotency_key="k-e1", event=ev)
    again, created2 = store.create_instance(_inst("e1b"), idempotency_key="k-e1", event=ev)
    assert created and not created2 and again.id == first.id
    evs = [e for e in store.read_events(count=1000) if e.kind == "requested"]
    assert [(e.instance, e.message) for e in evs] == [
        ("e1", "cms-wn:1 for cms")
    ]  # not for the idempotent hit


def test_transition_writes_event_and_wakes_waiters(store: StateStore) -> None:
    inst, _ = store.create_instance(_inst("e2"))
    placed = store.transition_from(
        inst,
        InstanceState.PLACED,
        bump_epoch=True,
        host="hv1",
        event=NewEvent(
            "placed", "on hv1", host="hv1", vo="cms", duration_s=0.25, extra={"libvirt_ms": "1.5"}
        ),
    )
    assert not store.wait_notified("e2", 0.05)  # no notify asked for
    store.transition_from(placed, InstanceState.BOOTING)
    booting = store.require_instance("e2")
    store.transition_from(
        booting, InstanceState.READY, event=NewEvent("ready", "up", host="hv1", notify=True)
    )
    assert store.wait_notified("e2", 1.0)
    evs = [e for e in store.read_events(count=1000) if e.instance == "e2"]
    assert [e.kind for e in evs] == ["placed", "ready"]
    assert evs[0].host == "hv1" and evs[0].extra == {"vo": "cms", "duration_ms": "250", "libvirt_ms": "1.5"}


def test_refused_transition_writes_no_event(store: StateStore) -> None:
    inst, _ = store.create_instance(_inst("e3"))
    store.transition_from(inst, InstanceState.PLACED, bump_epoch=True, host="hv1")
    with pytest.raises(ConflictError):  # a second placement from the same (now stale) read
        store.transition_from(
            inst,
            InstanceState.PLACED,
            bump_epoch=True,
            host="hv2",
            event=NewEvent("placed", "on hv2", host="hv2", notify=True),
        )
    assert _kinds(store, "e3") == []
    assert not store.wait_notified("e3", 0.05)
