"""The per-host watchdog on real QEMU guests: a hung agent (SIGSTOP) cannot keep its HA guests alive.

A farm of its own (2 hosts) so that stopping an agent and killing guests disturbs no other test.  The
agent started ``dynvm watchdog --host hv1`` itself; SIGSTOP of the agent stops its pets, the watchdog
destroys hv1's service guest within its timeout while the worker guest stays, and the service never runs
on two hosts at once (if a monitor restarts it elsewhere).  SIGCONT: the agent pets again, the watchdog
re-arms.  Then a dead virtlockd (storage leases gone) fences the host's service guests too.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ha.watchdog import holder, lock_file, read_status
from provisioner.configload import load_config
from provisioner.control.client import ENDED, choose_image, client_runtime, release, submit, wait
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.interfaces import DomainState
from provisioner.model import Instance, InstanceState
from provisioner.runtime import Runtime
from tests.conftest import wait_until
from tests.qemu_e2e.conftest import CACHE

pytestmark = [pytest.mark.qemu, pytest.mark.redis, pytest.mark.libvirt]


@dataclass
class WFarm:
    layout: FarmLayout
    rt: Runtime

    @property
    def run_dir(self) -> Path:
        return self.rt.config.storage.shared_dir / "run" / "agents"

    def agent_pid(self, host: str) -> int:
        st = self.layout.read_state()
        assert st is not None
        return st.children[f"agent-{host}"]

    def copies(self, iid: str) -> dict[str, DomainState]:
        """Where a domain of instance ``iid`` runs, read from each host's libvirt (not through agents)."""
        out: dict[str, DomainState] = {}
        for hc in self.rt.config.hosts:
            hv = LibvirtHost(hc.uri, call_timeout_s=10)
            try:
                for d in hv.list_domains():
                    if d.metadata.get("instance_id") == iid and d.state is DomainState.RUNNING:
                        out[hc.name] = d.state
            finally:
                hv.close()
        return out


@pytest.fixture(scope="module")
def wfarm() -> Iterator[WFarm]:
    if os.geteuid() != 0:
        pytest.fail("the QEMU farm tests need root (deselect them with -m 'not qemu')")
    layout = FarmLayout(CACHE / "dynvm-farm-watchdog")
    farm_down(layout)
    for stale in (layout.redis_dir, layout.shared / "run", layout.shared / "instances", layout.catalogue):
        shutil.rmtree(stale, ignore_errors=True)
    built = CACHE / "dynvm-farm" / "shared" / "images"  # the session farm's build: skip a rebuild
    if built.is_dir() and not (layout.shared / "images").exists():
        shutil.copytree(built, layout.shared / "images")
    farm_up(layout, 2, "qemu", timeout_s=180)
    rt = client_runtime(load_config(layout.config_file))
    yield WFarm(layout, rt)
    farm_down(layout)
    assert holder(lock_file(rt.config.storage.shared_dir / "run" / "agents", "hv1")) is None


def provision(f: WFarm, image: str | None, vo: str | None, **kw: str) -> Instance:
    img, vo_ = choose_image(f.rt, image, vo)
    inst, _ = submit(f.rt, img, vo_, **kw)  # type: ignore[arg-type]
    done = wait(f.rt, inst.id, 180)
    assert done.state is InstanceState.READY, done.reason
    return done


def test_agent_restart_is_not_a_host_death(wfarm: WFarm) -> None:
    """SIGKILL of the agent alone: the restarted agent takes the lease over (no gap), pets the same
    watchdog in time, and the service guest keeps running where it was, untouched."""
    wait_until(lambda: holder(lock_file(wfarm.run_dir, "hv1")) is not None, 30, what="hv1's watchdog")
    ce = provision(wfarm, "ce", None, host="hv1", service="ce-restart", ip="10.77.0.29")
    watchdog = holder(lock_file(wfarm.run_dir, "hv1"))
    old_pid, old_token = wfarm.agent_pid("hv1"), wfarm.rt.store.lease_holder("hv1")
    mark = wfarm.rt.store.read_events(count=1)
    since = mark[-1].id if mark else "0-0"
    # Kill right after a renewal (the successor's best case: the lease's whole TTL, 2 s in the fast class,
    # to start; a crash just before a renewal leaves it two thirds of that).  On this 2-core machine with
    # TCG guests booting, an agent start took 0.5-2.3 s: the fast class has little slack (see the report
    # of benchmarks/bench_agent_restart.py).
    seen = wfarm.rt.store.require_host("hv1").last_seen
    wait_until(lambda: wfarm.rt.store.require_host("hv1").last_seen != seen, 10, interval=0.005)
    os.kill(old_pid, signal.SIGKILL)
    holders: list[str | None] = []

    def new_holder() -> bool:
        holders.append(wfarm.rt.store.lease_holder("hv1"))
        return holders[-1] not in (None, old_token)

    wait_until(new_holder, 60, what="the restarted agent's lease")
    assert None not in holders, "the lease lapsed: the host looked dead"
    events = [e.kind for e in wfarm.rt.store.read_events(count=1000, since_id=since) if e.host == "hv1"]
    assert "agent_handover" in events and "lease_lost" not in events
    assert wfarm.copies(ce.id) == {"hv1": DomainState.RUNNING}
    assert holder(lock_file(wfarm.run_dir, "hv1")) == watchdog  # the same watchdog outlived the agent
    st = read_status(wfarm.run_dir, "hv1")
    assert st is not None and st["fired"] == 0 and st["armed"] is True
    inst = wfarm.rt.store.require_instance(ce.id)
    assert inst.host == "hv1" and inst.state is InstanceState.READY
    release(wfarm.rt, ce.id)
    wait(wfarm.rt, ce.id, 60, until=ENDED)


def test_hung_agent_watchdog_kills_its_service_guest_and_rearms(wfarm: WFarm) -> None:
    wait_until(lambda: holder(lock_file(wfarm.run_dir, "hv1")) is not None, 30, what="hv1's watchdog")
    ce = provision(wfarm, "ce", None, host="hv1", service="ce-wd", ip="10.77.0.30")
    wn = provision(wfarm, None, "cms", host="hv1")
    assert wfarm.copies(ce.id) == {"hv1": DomainState.RUNNING}
    st0 = read_status(wfarm.run_dir, "hv1")
    assert st0 is not None and st0["armed"] is True and st0["fired"] == 0
    pid = wfarm.agent_pid("hv1")
    os.kill(pid, signal.SIGSTOP)
    try:

        def service_gone() -> bool:
            copies = wfarm.copies(ce.id)
            assert len(copies) <= 1, f"two copies of the service at once: {copies}"
            return "hv1" not in copies

        wait_until(service_gone, 60, interval=0.05, what="the watchdog to destroy the service guest")

        # Its status file is rewritten every quarter second.
        def fired() -> bool:
            st = read_status(wfarm.run_dir, "hv1") or {}
            return st.get("fired") == 1 and st.get("killed") == [ce.domain_name] and st.get("armed") is False

        wait_until(fired, 10, what="the watchdog's status: fired once, killed the service")
        assert wfarm.copies(wn.id) == {"hv1": DomainState.RUNNING}  # workers are left alone
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(
        lambda: (read_status(wfarm.run_dir, "hv1") or {}).get("armed") is True,
        30,
        what="the watchdog to re-arm on the agent's pets",
    )
    assert wfarm.agent_pid("hv1") == pid  # the same agent, petting again
    assert wfarm.copies(wn.id) == {"hv1": DomainState.RUNNING}


def test_dead_virtlockd_fences_the_hosts_service_guests(wfarm: WFarm) -> None:
    hc = wfarm.rt.config.host("hv2")
    assert hc is not None and hc.virtlockd_pidfile is not None
    ce = provision(wfarm, "ce", None, host="hv2", service="ce-lock", ip="10.77.0.31")
    wn = provision(wfarm, None, "cms", host="hv2")
    mark = wfarm.rt.store.read_events(count=1)
    since = mark[-1].id if mark else "0-0"
    os.kill(int(hc.virtlockd_pidfile.read_text().strip()), signal.SIGKILL)
    wait_until(lambda: "hv2" not in wfarm.copies(ce.id), 30, what="the service fenced after virtlockd died")
    assert wfarm.copies(wn.id) == {"hv2": DomainState.RUNNING}
    events = [e for e in wfarm.rt.store.read_events(count=1000, since_id=since) if e.host == "hv2"]
    assert any(e.kind == "storage_fenced" and "virtlockd" in e.message for e in events), events
