"""Service health on real parts without QEMU: the health marks' compare-and-set on the real Redis, and the
agent's health loop on libvirt's real test driver (in this process: a paused domain is a hung service)
with the real world's keeper actions (mark, re-place) and the agent's real boot in between."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ha.health import HealthStore, Mark
from ha.keeper import Hung, Start
from ha.leader import LeaderLease
from ha.services import Service, ServiceStore
from ha.world import RedisWorld
from provisioner.agent.health import HealthLoop
from provisioner.agent.lifecycle import boot_instance
from provisioner.agent.loops import loop_fields, read_loops
from provisioner.catalogue.model import ImageKind
from provisioner.configload import load_config
from provisioner.errors import ConflictError
from provisioner.hypervisor.domxml import DomainSpec, build_domain_xml
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.hypervisor.testdriver import write_test_host_xml
from provisioner.interfaces import DomainState
from provisioner.model import Capacity, Host, Instance, InstanceState, Role, Tier
from provisioner.runtime import Runtime, build_runtime, resolve_image
from provisioner.state import StateStore
from tests.catalogue.helpers import make_catalogue, write_config
from tests.conftest import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
S = InstanceState


def ready_service(store: StateStore, iid: str, host: str, image: str, service: str = "ce-01") -> Instance:
    store.create_instance(Instance(iid, Role.SERVICE, image, 1, 256, tier=Tier.CRITICAL, service=service,
                                   ip="10.9.0.10", mac="52:54:00:00:00:10", created=time.time()))
    assert store.claim(host, iid, 1, 256)
    read = store.transition_from(store.require_instance(iid), S.PLACED, bump_epoch=True, host=host)
    return store.transition_from(store.transition_from(read, S.BOOTING), S.READY)


def events(store: StateStore, iid: str) -> list[str]:
    return [e.kind for e in store.read_events(count=500) if e.instance == iid]


# -- the marks' compare-and-set ------------------------------------------------------------------------------


def test_marks_are_compare_and_set_on_record_and_mark_and_the_keepers_on_its_fence(redis_url: str) -> None:
    store = StateStore(redis_url)
    for h in ("hv1", "hv2"):
        store.register_host(Host(h, "test:///default", capacity=Capacity(8, 8192)))
        store.renew_lease(h, f"agent-{h}", 60)
    marks = HealthStore(store.r, store.keys.prefix)
    rec = ready_service(store, "m1", "hv1", "ce:1")
    agent = {"state": S.READY, "host": "hv1", "epoch": rec.epoch}
    healthy, unhealthy = frozenset({Mark.HEALTHY}), frozenset({Mark.UNHEALTHY})
    assert marks.get("m1") is None
    marks.set("m1", **agent, expect=healthy, new=Mark.UNHEALTHY, failures=3, detail="no\nanswer")
    got = marks.get("m1")
    assert got is not None and (got.mark, got.epoch, got.failures, got.detail) == (
        Mark.UNHEALTHY, rec.epoch, 3, "no answer")
    with pytest.raises(ConflictError, match="marked unhealthy"):  # said once: the mark moved on
        marks.set("m1", **agent, expect=healthy, new=Mark.UNHEALTHY)
    with pytest.raises(ConflictError, match="on hv1"):  # another host's agent cannot mark it
        marks.set("m1", state=S.READY, host="hv2", epoch=rec.epoch, expect=unhealthy, new=Mark.HEALTHY)
    # the keeper's mark needs the leading fence
    with pytest.raises(ConflictError, match="no longer leads"):
        marks.set("m1", **agent, expect=unhealthy, new=Mark.RESTART, fence=1)
    lead = LeaderLease(store.r, store.keys.prefix, "m-a", 30).acquire_or_renew()
    with pytest.raises(ConflictError, match="no longer leads"):
        marks.set("m1", **agent, expect=unhealthy, new=Mark.RESTART, fence=lead.fence + 1)
    marks.set("m1", **agent, expect=unhealthy, new=Mark.RESTART, fence=lead.fence)
    # a new placement (epoch) makes the old mark say nothing
    moved = store.transition_from(store.require_instance("m1"), S.READY, bump_epoch=True)
    got = marks.get("m1")
    assert got is not None and got.current(moved.epoch) is Mark.HEALTHY
    assert got.current(rec.epoch) is Mark.RESTART
    with pytest.raises(ConflictError, match="epoch"):
        marks.set("m1", **agent, expect=frozenset({Mark.RESTART}), new=Mark.HEALTHY)
    marks.set("m1", state=S.READY, host="hv1", epoch=moved.epoch, expect=healthy, new=Mark.UNHEALTHY)
    store.close()


# -- the agent's loop and the keeper's actions on the test driver ------------------------------------------


@dataclass
class Agent:
    rt: Runtime
    hv: LibvirtHost
    image: str
    lead: int
    sent: list[dict[str, str]]


@pytest.fixture()
def agent(redis_url: str, tmp_path: Path) -> Iterator[Agent]:
    cat, root = make_catalogue(tmp_path)
    doc = yaml.safe_load((cat / "ce.yaml").read_text())
    doc["ha"]["max_restarts"] = 1
    for v in doc["versions"]:
        v["health"] = {"type": "guest_agent", "interval_s": 0.1, "timeout_s": 1, "failures": 2}
    (cat / "ce.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    uri = write_test_host_xml(tmp_path / "hv.xml", cpus=8, memory_mib=8192)
    hosts = "".join(f"  - {{name: {h}, uri: '{uri}'}}\n" for h in ("hv1", "hv2"))
    cfg = load_config(write_config(tmp_path, cat, root, extra=f"redis_url: {redis_url}\nhosts:\n{hosts}"))
    rt = build_runtime(cfg, host="hv1")
    hv = LibvirtHost(uri)
    rt.hypervisor = hv
    for h in ("hv1", "hv2"):
        rt.store.register_host(Host(h, uri, capacity=Capacity(8, 8192)))
        rt.store.renew_lease(h, f"agent-{h}", 60)
    image = resolve_image(rt, "ce")
    assert image.kind is ImageKind.SERVICE and image.spec.health is not None
    lead = LeaderLease(rt.store.r, rt.store.keys.prefix, "m-test", 60).acquire_or_renew().fence
    sent: list[dict[str, str]] = []
    yield Agent(rt, hv, image.ref, lead, sent)
    hv.close()
    rt.store.close()


def start_domain(a: Agent, inst: Instance) -> None:
    spec = DomainSpec(name=inst.domain_name, uuid=str(uuid.uuid4()), domain_type="test", vcpus=1,
                      memory_mib=256, console_pty=False,
                      metadata={"instance_id": inst.id, "role": "service", "image": inst.image})
    a.hv.define_and_start(inst.domain_name, build_domain_xml(spec))


def suspend(a: Agent, inst: Instance, pause: bool = True) -> None:
    def op(conn: object) -> None:
        dom = conn.lookupByName(inst.domain_name)  # type: ignore[attr-defined]
        dom.suspend() if pause else dom.resume()

    a.hv._call("suspend" if pause else "resume", op)


def mark_of(a: Agent, iid: str) -> Mark | None:
    h = HealthStore(a.rt.store.r, a.rt.store.keys.prefix).get(iid)
    inst = a.rt.store.require_instance(iid)
    return h.current(inst.epoch) if h is not None else None


def test_hung_vm_found_restarted_in_place_then_relocated(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, store = agent, agent.rt.store
    services = ServiceStore(store.r, store.keys.prefix)
    services.declare(Service("ce-01", "ce", Tier.CRITICAL, "10.9.0.10"))
    rec = ready_service(store, "h1", "hv1", a.image)
    services.set_current("ce-01", "h1", restarted=False)
    start_domain(a, rec)
    world = RedisWorld(a.rt)
    booted: list[tuple[str, str]] = []
    monkeypatch.setattr(world, "start", lambda placements: booted.extend(placements.items()))
    loop = HealthLoop(a.rt, tick_s=0.05)
    loop.start()
    try:
        wait_until(lambda: loop.stats.passes > 10, timeout=30, what="the loop's first passes")
        assert mark_of(a, "h1") is None  # a running domain: healthy, nothing written
        suspend(a, rec)
        wait_until(lambda: mark_of(a, "h1") is Mark.UNHEALTHY, timeout=30, what="unhealthy")
        suspend(a, rec, pause=False)  # it answers again: healthy again
        wait_until(lambda: mark_of(a, "h1") is Mark.HEALTHY, timeout=30, what="healthy again")
        assert events(store, "h1")[-2:] == ["service_unhealthy", "service_healthy"]

        # Hang 1: the keeper marks a restart (counted); the agent destroys it and records it lost.
        suspend(a, rec)
        wait_until(lambda: mark_of(a, "h1") is Mark.UNHEALTHY, timeout=30, what="unhealthy again")
        assert world.mark_hung(Hung("ce-01", "h1", "hv1", rec.epoch, Mark.RESTART, "test"), a.lead)
        assert not world.mark_hung(Hung("ce-01", "h1", "hv1", rec.epoch, Mark.RESTART, "test"), a.lead)
        assert len(services.restarts("ce-01")) == 1  # counted once
        lost = wait_until(lambda: (r := store.require_instance("h1")).state is S.LOST and r, timeout=30,
                          what="the agent to stop it")
        assert a.hv.state(rec.domain_name) is DomainState.MISSING and "h1" not in store.claims_on("hv1")
        assert lost.reason == "hung, stopped for a restart in place" and mark_of(a, "h1") is Mark.RESTART
        # The keeper re-places the same record on the same host; the agent boots it.
        assert world.start_service(Start("ce-01", "hv1", "restart", instance="h1"), a.lead)
        placed = store.require_instance("h1")
        assert (placed.state, placed.host, placed.ip, placed.mac) == (S.PLACED, "hv1", rec.ip, rec.mac)
        assert placed.epoch > lost.epoch and booted == [("h1", "hv1")] and "h1" in store.claims_on("hv1")
        assert not world.start_service(Start("ce-01", "hv1", "restart", instance="h1"), a.lead)  # once
        boot_instance(a.rt, "h1")
        second = store.require_instance("h1")
        assert second.state is S.READY and a.hv.state(rec.domain_name) is DomainState.RUNNING
        assert mark_of(a, "h1") is Mark.HEALTHY  # the old mark was about the old placement

        # Hang 2: relocated (the keeper's mark; the agent stops it; re-placed away from hv1).
        suspend(a, second)
        wait_until(lambda: mark_of(a, "h1") is Mark.UNHEALTHY, timeout=30, what="unhealthy (2)")
        assert world.mark_hung(Hung("ce-01", "h1", "hv1", second.epoch, Mark.RELOCATE, "test"), a.lead)
        wait_until(lambda: store.require_instance("h1").state is S.LOST, timeout=30, what="stopped (2)")
        assert world.start_service(Start("ce-01", None, "relocate", instance="h1", avoid="hv1"), a.lead)
        moved = store.require_instance("h1")
        assert (moved.state, moved.host) == (S.PLACED, "hv2") and booted[-1] == ("h1", "hv2")
        assert len(services.restarts("ce-01")) == 1  # a relocation is no restart in place
    finally:
        loop.close()
    kinds = events(store, "h1")
    assert kinds.count("service_stopped") == 2 and kinds.count("service_unhealthy") == 3
    assert loop.stats.errors == 0, loop.stats.last_error
    stats = loop_fields(read_loops(store.r, store.keys.prefix, "hv1"), time.time())  # `dynvm host show hv1`
    assert int(stats["health_loop_passes"]) > 0 and stats["health_loop_errors"] == "0"
    assert float(stats["health_loop_last_run"]) > 0


def test_a_vm_without_a_health_probe_is_never_judged(agent: Agent) -> None:
    a, store = agent, agent.rt.store
    img = resolve_image(a.rt, "wms")
    assert img.spec.health is not None
    cms = resolve_image(a.rt, "cms-wn")
    assert cms.spec.health is None
    rec = ready_service(store, "n1", "hv1", cms.ref, service="svc-n")
    start_domain(a, rec)
    suspend(a, rec)
    loop = HealthLoop(a.rt, tick_s=0.05)
    loop.start()
    try:
        wait_until(lambda: loop.stats.passes > 20, timeout=30, what="passes")
    finally:
        loop.close()
    assert HealthStore(store.r, store.keys.prefix).get("n1") is None and loop.stats.errors == 0


def test_a_stop_left_halfway_is_finished_and_a_release_is_not_mistaken_for_one(agent: Agent) -> None:
    """An agent that died between ``ready -> stopping`` and the destroy: its successor's loop finishes the
    stop from the record (reason + mark).  A stopping record of an operator's release is not touched."""
    from provisioner.agent.health import STOPPING_WHY

    a, store = agent, agent.rt.store
    marks = HealthStore(store.r, store.keys.prefix)
    rec = ready_service(store, "s1", "hv1", a.image, service="ce-01")
    start_domain(a, rec)
    ready = {"state": S.READY, "host": "hv1", "epoch": rec.epoch}
    marks.set("s1", **ready, expect=frozenset({Mark.HEALTHY}), new=Mark.UNHEALTHY)
    marks.set("s1", **ready, expect=frozenset({Mark.UNHEALTHY}), new=Mark.RESTART, fence=a.lead)
    store.transition_from(rec, S.STOPPING, reason=f"{STOPPING_WHY}a restart in place")
    other = ready_service(store, "s2", "hv1", a.image, service="ce-02")  # being released by an operator
    start_domain(a, other)
    marks.set("s2", state=S.READY, host="hv1", epoch=other.epoch, expect=frozenset({Mark.HEALTHY}),
              new=Mark.UNHEALTHY)
    marks.set("s2", state=S.READY, host="hv1", epoch=other.epoch, expect=frozenset({Mark.UNHEALTHY}),
              new=Mark.RESTART, fence=a.lead)
    store.transition_from(other, S.STOPPING)
    loop = HealthLoop(a.rt, tick_s=0.05)
    loop.start()
    try:
        done = wait_until(lambda: (r := store.require_instance("s1")).state is S.LOST and r, timeout=30,
                          what="the halfway stop to be finished")
        wait_until(lambda: loop.stats.passes > 20, timeout=30, what="more passes")
    finally:
        loop.close()
    assert done.reason == "hung, stopped for a restart in place" and done.epoch == rec.epoch
    assert a.hv.state(rec.domain_name) is DomainState.MISSING and "service_stopped" in events(store, "s1")
    assert store.require_instance("s2").state is S.STOPPING  # the release's, left to the release task
    assert a.hv.state(other.domain_name) is DomainState.RUNNING
