"""Hosts, instances, leases, events and snapshots against a real Redis."""

from __future__ import annotations

import pickle

import pytest

from provisioner.errors import ConflictError, NotFoundError, UnavailableError, ValidationError
from provisioner.model import Capacity, Host, HostState, Instance, InstanceState, Role, Tier
from provisioner.state import StateStore
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.redis


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    return StateStore.from_url(redis_url)


def hv(name: str = "hv01", vcpus: int = 8, **kw: object) -> Host:
    return Host(name, "test:///default", capacity=Capacity(vcpus, 16384, 100), labels={"rack": "r1"}, **kw)  # type: ignore[arg-type]


def inst(iid: str = "i1", role: Role = Role.WORKER, **kw: object) -> Instance:
    return Instance(iid, role, "cms-wn:2026.11.2", 2, 2048, vo="cms", **kw)  # type: ignore[arg-type]


def test_register_and_read_host(store: StateStore) -> None:
    h = store.register_host(hv())
    assert (h.name, h.capacity, h.labels, h.state, h.epoch) == (
        "hv01",
        Capacity(8, 16384, 100),
        {"rack": "r1"},
        HostState.UP,
        1,
    )
    assert [x.name for x in store.list_hosts()] == ["hv01"]
    assert store.get_host("nope") is None


def test_reregister_keeps_state_and_claims_and_bumps_epoch(store: StateStore) -> None:
    store.register_host(hv())
    assert store.claim("hv01", "i1", 3, 1024, require_lease=False)
    store.set_host_state("hv01", HostState.DEAD, expected=HostState.UP, reason="lease expired")
    store.set_host_state("hv01", HostState.FENCED, expected=HostState.DEAD, reason="fenced by monitor")
    h = store.register_host(hv(vcpus=16))
    assert (h.state, h.capacity.vcpus, h.used_vcpus, h.epoch) == (HostState.FENCED, 16, 3, 2)
    assert store.host_reason("hv01") == "fenced by monitor"


def test_new_host_takes_given_state(store: StateStore) -> None:
    assert store.register_host(hv(state=HostState.MAINTENANCE)).state is HostState.MAINTENANCE


def test_set_host_state_unknown_host(store: StateStore) -> None:
    with pytest.raises(NotFoundError, match="'ghost'"):
        store.set_host_state("ghost", HostState.DEAD, expected=HostState.UP)
    assert store.get_host("ghost") is None


def test_set_host_state_records_event(store: StateStore) -> None:
    store.register_host(hv())
    prev = store.set_host_state("hv01", HostState.DRAINING, expected=HostState.UP, reason="operator")
    assert prev is HostState.UP
    ev = store.read_events()[-1]
    assert (ev.kind, ev.host, ev.message) == ("host_state", "hv01", "up -> draining: operator")


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "a*", "a{b}", "a\nb", "ä", "a/b"])
def test_ids_are_validated_before_reaching_a_key(store: StateStore, bad: str) -> None:
    with pytest.raises(ValidationError):
        store.get_host(bad)
    with pytest.raises(ValidationError):
        store.get_instance(bad)
    with pytest.raises(ValidationError):
        store.create_instance(inst(), idempotency_key=bad)
    with pytest.raises(ValidationError):
        store.claim(bad, "i1", 1, 1)
    with pytest.raises(ValidationError):
        store.transition("i1", InstanceState.PLACED, host=bad)
    assert store.r.dbsize() == 0


def test_unreachable_redis_names_the_url() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    s = StateStore.from_url(url)  # no I/O yet
    with pytest.raises(UnavailableError) as info:
        s.ping()
    msg = str(info.value)
    assert "127.0.0.1" in msg and "secret" not in msg and "\n" not in msg
    with pytest.raises(UnavailableError):
        s.get_host("hv01")
    assert str(pickle.loads(pickle.dumps(info.value))) == msg


def test_create_get_list(store: StateStore) -> None:
    a, created = store.create_instance(inst("a"))
    assert created and a.created > 0
    store.create_instance(inst("b", role=Role.SERVICE, tier=Tier.CRITICAL))
    assert store.get_instance("a") == a
    assert [i.id for i in store.list_instances()] == ["a", "b"]
    assert [i.id for i in store.list_instances(role=Role.SERVICE)] == ["b"]
    assert [i.id for i in store.list_instances(state=InstanceState.REQUESTED, role=Role.WORKER)] == ["a"]
    with pytest.raises(ConflictError, match="'a' already exists"):
        store.create_instance(inst("a"))


def test_idempotency_key_returns_first_instance(store: StateStore) -> None:
    first, c1 = store.create_instance(inst("a"), idempotency_key="slurm:1234")
    again, c2 = store.create_instance(inst("b"), idempotency_key="slurm:1234")
    assert (c1, c2, again.id) == (True, False, "a")
    assert store.get_instance("b") is None
    assert store.instance_for_key("slurm:1234") == first


def test_update_fields_and_host_index(store: StateStore) -> None:
    store.create_instance(inst("a"))
    store.transition("a", InstanceState.PLACED, host="hv01")
    assert [i.id for i in store.list_instances(host="hv01")] == ["a"]
    moved = store.update_instance_fields("a", host="hv02", ip="10.0.0.5", attempts=2)
    assert (moved.host, moved.ip, moved.attempts) == ("hv02", "10.0.0.5", 2)
    assert store.list_instances(host="hv01") == []
    assert [i.id for i in store.list_instances(host="hv02")] == ["a"]
    assert store.update_instance_fields("a", ip=None).ip is None
    with pytest.raises(ValidationError, match="'state'"):
        store.update_instance_fields("a", state="ready")
    with pytest.raises(ValidationError, match="'bogus'"):
        store.update_instance_fields("a", bogus=1)
    with pytest.raises(NotFoundError):
        store.update_instance_fields("zz", ip="1.2.3.4")


def test_delete_instance_removes_everything(store: StateStore) -> None:
    store.register_host(hv())
    store.create_instance(inst("a"), idempotency_key="slurm:9")
    store.transition("a", InstanceState.PLACED, host="hv01")
    assert store.claim("hv01", "a", 2, 2048, require_lease=False)
    assert store.delete_instance("a")
    assert not store.delete_instance("a")
    assert store.get_instance("a") is None and store.instance_for_key("slurm:9") is None
    assert store.list_instances(host="hv01") == [] and store.list_instances() == []
    assert store.get_host("hv01").used_vcpus == 0  # type: ignore[union-attr]
    # The key is free again: a new request with it creates a new instance.
    assert store.create_instance(inst("c"), idempotency_key="slurm:9")[1]


def test_lease_expires(store: StateStore) -> None:
    store.register_host(hv())
    assert not store.lease_alive("hv01")
    store.renew_lease("hv01", "agent-1", 0.2)
    assert store.lease_alive("hv01") and store.lease_holder("hv01") == "agent-1"
    assert 0 < store.lease_ttl_ms("hv01") <= 200
    assert store.get_host("hv01").last_seen > 0  # type: ignore[union-attr]
    wait_until(lambda: not store.lease_alive("hv01"), timeout=5, what="lease to expire")


def test_lease_unknown_host_and_drop(store: StateStore) -> None:
    with pytest.raises(NotFoundError):
        store.renew_lease("ghost", "t", 1)
    store.register_host(hv())
    store.renew_lease("hv01", "agent-1", 10)
    assert not store.drop_lease("hv01", "agent-2")
    assert store.drop_lease("hv01", "agent-1") and not store.lease_alive("hv01")


def test_events_read_and_follow(store: StateStore) -> None:
    e1 = store.add_event("requested", "cms-wn for cms", instance="a")
    store.add_event("placed", instance="a", host="hv01", attempt="1")
    evs = store.read_events()
    assert [(e.kind, e.instance, e.host) for e in evs] == [("requested", "a", None), ("placed", "a", "hv01")]
    assert evs[1].extra == {"attempt": "1"} and evs[0].ts.endswith("Z") and "T" in evs[0].ts
    assert [e.kind for e in store.read_events(since_id=e1)] == ["placed"]
    assert store.wait_events(store.last_event_id(), block_ms=10) == []
    store.add_event("ready", instance="a")
    got = next(store.follow_events(since_id=evs[1].id, block_ms=100))
    assert got.kind == "ready"


def test_event_stream_is_capped(redis_url: str) -> None:
    s = StateStore(redis_url, events_maxlen=100)
    for i in range(1000):
        s.add_event("tick", str(i))
    assert int(s.r.xlen(s.keys.events)) < 300  # approximate trimming (MAXLEN ~)
    assert s.read_events(count=1)[0].message == "999"


def test_notify_wakes_waiter(store: StateStore) -> None:
    assert not store.wait_notified("a", 0.05)
    store.notify("a")
    assert store.wait_notified("a", 1.0)


def test_snapshot(store: StateStore) -> None:
    store.register_host(hv("hv01"))
    store.register_host(hv("hv02"))
    store.create_instance(inst("a"))
    store.create_instance(inst("b"))
    store.transition("b", InstanceState.GONE)
    store.claim("hv02", "a", 2, 2048, require_lease=False)
    snap = store.snapshot()
    assert [h.name for h in snap.hosts] == ["hv01", "hv02"]
    assert snap.hosts[1].used_vcpus == 2 and snap.hosts[1].used_memory_mib == 2048
    assert [i.id for i in snap.instances] == ["a"]  # gone instances are left out


def test_prefixes_are_isolated(redis_url: str) -> None:
    a, b = StateStore(redis_url, prefix="siteA"), StateStore(redis_url, prefix="siteB")
    a.register_host(hv())
    assert b.list_hosts() == [] and len(a.list_hosts()) == 1
