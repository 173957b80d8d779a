"""A hung service on real QEMU guests (issue #10, service health): a declared CE is hung from the outside
(``virsh suspend`` through its host's libvirtd: a paused guest answers nothing), its host's agent finds it
unhealthy by the CE's guest_agent health probe, the leader's keeper restarts it in place (same host, same
record, MAC, address and disk; a new boot), and when it hangs again past the image's restart limit
relocates it to another host, where it comes back ready and answering on its address.  A watcher looks at
every host's libvirt the whole time: never two running copies.  The events show each step."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import libvirt
import pytest
import yaml

from ha.health import HealthStore, Mark
from ha.leader import LeaderLease
from ha.services import Service, ServiceStore
from ha.world import RedisWorld
from provisioner.control.client import ENDED, release, wait
from provisioner.execchan import run_in_guest
from provisioner.execchan.client import exec_socket
from provisioner.model import Instance, InstanceState, Tier
from tests.conftest import wait_until
from tests.ha_qemu.conftest import HAFarm
from tests.ha_qemu.test_failover_qemu import http_get

pytestmark = [pytest.mark.qemu, pytest.mark.redis, pytest.mark.libvirt, pytest.mark.slow]
NAME, ADDRESS = "ce-hang", "10.77.0.60"


@pytest.fixture(autouse=True)
def ha_running(hafarm: HAFarm) -> Iterator[None]:
    """HA armed and a leader monitor, as in test_failover_qemu."""
    RedisWorld(hafarm.rt).resume()
    wait_until(lambda: LeaderLease(hafarm.rt.store.r, hafarm.rt.store.keys.prefix, "t", 1.0).current(),
               timeout=60, what="a leader monitor")
    yield


@pytest.fixture()
def quick_ce(hafarm: HAFarm) -> Iterator[None]:
    """The farm's ce.yaml with a fast health probe (every 1 s, 3 s each, 2 failures) and one restart in
    place allowed, so the test reaches the relocation quickly; restored afterwards (agents and monitors
    reload an edited catalogue)."""
    path = hafarm.layout.catalogue / "ce.yaml"
    original = path.read_text()
    doc = yaml.safe_load(original)
    doc["ha"]["max_restarts"] = 1
    for v in doc["versions"]:
        v["health"] = {"type": "guest_agent", "interval_s": 1, "timeout_s": 3, "failures": 2}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.rename(path)
    try:
        yield
    finally:
        tmp.write_text(original)
        tmp.rename(path)


class Copies:
    """Counts, every 0.2 s, on how many hosts the service's domain is active (running or paused)."""

    def __init__(self, farm: HAFarm, domain: str) -> None:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "no domain" is an answer here
        self.conns = {h.name: libvirt.open(h.uri) for h in farm.rt.config.hosts}
        self.domain = domain
        self.max_seen = 0
        self.samples = 0
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def active_on(self) -> list[str]:
        out = []
        for name, conn in self.conns.items():
            try:
                if conn.lookupByName(self.domain).isActive():
                    out.append(name)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    self.errors.append(f"{name}: {err}")
        return out

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.max_seen = max(self.max_seen, len(self.active_on()))
            self.samples += 1

    def suspend(self, host: str) -> None:
        self.conns[host].lookupByName(self.domain).suspend()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for conn in self.conns.values():
            conn.close()


def boot_id(farm: HAFarm, inst: Instance) -> str:
    assert inst.host is not None
    sock = exec_socket(farm.rt.config.storage.shared_dir, inst.id, inst.host)
    res = run_in_guest(sock, ["cat", "/proc/sys/kernel/random/boot_id"], timeout=30)
    assert res.exit_code == 0, res.stderr
    return res.stdout.strip()


def ready_again(farm: HAFarm, iid: str, after_epoch: int) -> Instance:
    def check() -> Instance | None:
        rec = farm.rt.store.get_instance(iid)
        ok = rec is not None and rec.state is InstanceState.READY and rec.epoch > after_epoch
        return rec if ok else None

    found: Instance = wait_until(check, timeout=240, interval=0.2, what=f"{iid} ready after {after_epoch}")
    return found


def steps(farm: HAFarm, iid: str, since: str, t0: float | None = None) -> list[str]:
    """The health steps of our service, in order, from the events after ``since``; with ``t0`` (when the
    guest was suspended) the timeline is printed with each step's offset (run with -s to see it)."""
    wanted = {"service_unhealthy", "service_hung", "service_stopped", "service_start", "placed", "ready"}
    out = []
    for e in farm.rt.store.read_events(count=1000, since_id=since):
        if e.kind in wanted and (e.instance == iid or NAME in e.message):
            out.append(f"{e.kind}@{e.host}")
            if t0 is not None:
                at = datetime.fromisoformat(e.ts.replace("Z", "+00:00")).timestamp() - t0
                print(f"  +{at:6.2f} s  {e.kind:18} {e.host or '-':5} {e.message[:90]}")
    return out


def test_a_hung_service_is_restarted_in_place_then_relocated(hafarm: HAFarm, quick_ce: Any) -> None:
    rt = hafarm.rt
    services = ServiceStore(rt.store.r, rt.store.keys.prefix)
    marks = HealthStore(rt.store.r, rt.store.keys.prefix)
    services.declare(Service(NAME, "ce", Tier.CRITICAL, ADDRESS))
    copies: Copies | None = None
    iid: str | None = None
    try:
        iid = wait_until(lambda: services.current_instance(NAME), timeout=60, what="the keeper to start it")
        first = wait(rt, iid, 240)
        assert first.state is InstanceState.READY, first.reason
        assert first.host is not None and first.ip == ADDRESS
        assert "ce data disk" in http_get(hafarm, ADDRESS)
        copies = Copies(hafarm, first.domain_name)
        boot1 = boot_id(hafarm, first)
        since = rt.store.last_event_id()

        # Hang 1: restarted in place (same host, same record and address, a new boot).
        t0 = time.time()
        copies.suspend(first.host)
        second = ready_again(hafarm, iid, first.epoch)
        assert second.host == first.host and (second.mac, second.ip) == (first.mac, first.ip)
        boot2 = boot_id(hafarm, second)
        assert boot2 != boot1
        assert "ce data disk" in http_get(hafarm, ADDRESS)  # its own data disk, on its address
        assert len(services.restarts(NAME)) == 1
        h = f"@{first.host}"
        print(f"\nhang 1 (suspended at +0), restart in place on {first.host}:")
        assert steps(hafarm, iid, since, t0) == [
            f"service_unhealthy{h}", f"service_hung{h}", f"service_stopped{h}", f"placed{h}",
            f"service_start{h}", f"ready{h}",
        ]
        since = rt.store.last_event_id()

        # Hang 2, past the limit of one restart in place: relocated to another host.
        t0 = time.time()
        copies.suspend(first.host)
        third = ready_again(hafarm, iid, second.epoch)
        assert third.host not in (None, first.host) and (third.mac, third.ip) == (first.mac, first.ip)
        boot3 = boot_id(hafarm, third)
        assert boot3 not in (boot1, boot2)
        assert "ce data disk" in http_get(hafarm, ADDRESS)  # the same disk, now served from elsewhere
        assert len(services.restarts(NAME)) == 1  # a relocation is not a restart in place
        t = f"@{third.host}"
        print(f"hang 2 (suspended at +0), past the limit: relocated {first.host} -> {third.host}:")
        assert steps(hafarm, iid, since, t0) == [
            f"service_unhealthy{h}", f"service_hung{h}", f"service_stopped{h}", f"placed{t}",
            "service_start@None", f"ready{t}",
        ]
        hung = [e for e in rt.store.read_events(count=1000, since_id=since) if e.kind == "service_hung"]
        assert "relocating" in hung[0].message and "limit 1" in hung[0].message
        # Healthy where it runs now: the next samples pass and nothing is marked.
        mark = marks.get(iid)
        assert mark is None or mark.current(third.epoch) is Mark.HEALTHY
        assert copies.active_on() == [third.host]
    finally:
        if copies is not None:
            copies.close()
        services.remove(NAME)
        if iid is not None:
            release(rt, iid)
            wait(rt, iid, 120, until=ENDED)
    assert copies.samples > 20 and copies.errors == []
    assert copies.max_seen == 1  # never two copies, at any moment we looked
