"""Failover end to end on real parts: test-driver host agents as processes, a control worker, the real
Redis, and the monitor (leader) in this process.  Killing an agent kills its host here: a test-driver
host lives inside its agent's process, so its VMs die with it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ha.engine import Settings
from ha.monitor import Monitor, MonitorSettings
from ha.recovery import RecoveryStore, Step
from provisioner.control.client import choose_image, submit, wait
from provisioner.model import HostState, InstanceState
from tests.conftest import wait_until
from tests.control.ministack import mini_stack, stack_config

pytestmark = [pytest.mark.redis, pytest.mark.libvirt, pytest.mark.slow]


def test_a_dead_hosts_services_come_back_on_survivors_and_its_workers_are_lost(
    redis_url: str, tmp_path: Path
) -> None:
    cfg = stack_config(tmp_path, redis_url, ["hv1", "hv2", "hv3"], cpus=8)
    with mini_stack(tmp_path / "stack", cfg, workers=1) as stack:
        rt = stack.rt
        ce_img, _ = choose_image(rt, "ce", None)
        se_img, _ = choose_image(rt, "se", None)
        cms_img, vo = choose_image(rt, "cms-wn", "cms")
        ce, _ = submit(rt, ce_img, None, service="ce-01", host="hv1")
        se, _ = submit(rt, se_img, None, service="se-01", host="hv1")
        wn, _ = submit(rt, cms_img, vo, host="hv1", owner="slurm:42")
        for i in (ce, se, wn):
            assert wait(rt, i.id, 60).state is InstanceState.READY
            assert rt.store.require_instance(i.id).host == "hv1"
        settings = MonitorSettings(round_s=0.05, lease_ttl_s=1.0, engine=Settings(watchdog_s=1.0))
        mon = Monitor(rt, settings, "m1")
        stop = threading.Event()
        t = threading.Thread(target=mon.run, args=(stop,), daemon=True)
        t.start()
        try:
            wait_until(lambda: mon.fence > 0 and mon.rounds > 5, timeout=10, what="monitor leading")
            stack.procs["agent-hv1"].kill()  # the host dies with its agent
            recs = RecoveryStore(rt.store.r, rt.store.keys.prefix)
            wait_until(
                lambda: (r := recs.get("hv1")) is not None and r.step is Step.CLOSED,
                timeout=60,
                interval=0.1,
                what="hv1's recovery to close",
            )
        finally:
            stop.set()
            t.join(timeout=10)
        for i in (ce, se):
            rec = rt.store.require_instance(i.id)
            assert rec.state is InstanceState.READY and rec.host in ("hv2", "hv3"), rec
            assert rec.epoch > i.epoch
        assert rt.store.require_instance(wn.id).state is InstanceState.LOST
        host = rt.store.require_host("hv1")
        assert host.state is HostState.FENCED
        timeline = ["host_dead", "recovery_fenced", "recovery_planned", "recovery_started", "recovery_closed"]
        kinds = [e.kind for e in rt.store.read_events(count=500) if e.kind in timeline and e.host == "hv1"]
        assert kinds == timeline
        assert mon.errors == 0, mon.last_error


def test_declared_services_are_started_and_restarted_in_place(redis_url: str, tmp_path: Path) -> None:
    from ha.services import Service, ServiceStore
    from provisioner.control.client import release
    from provisioner.model import Tier

    cfg = stack_config(tmp_path, redis_url, ["hv1", "hv2"], cpus=8)
    with mini_stack(tmp_path / "stack", cfg, workers=1) as stack:
        rt = stack.rt
        services = ServiceStore(rt.store.r, rt.store.keys.prefix)
        services.declare(Service("wms-01", "wms", Tier.NORMAL, "10.9.0.30"))
        mon = Monitor(rt, MonitorSettings(round_s=0.05, lease_ttl_s=1.0), "m1")
        stop = threading.Event()
        t = threading.Thread(target=mon.run, args=(stop,), daemon=True)
        t.start()
        try:

            def ready_vm() -> str | None:
                iid = services.current_instance("wms-01")
                inst = rt.store.get_instance(iid) if iid else None
                return inst.id if inst is not None and inst.state is InstanceState.READY else None

            first = wait_until(ready_vm, timeout=60, interval=0.1, what="the keeper to start wms-01")
            vm = rt.store.require_instance(first)
            assert vm.service == "wms-01" and vm.ip == "10.9.0.30"
            release(rt, first)  # the VM goes away behind HA's back
            wait(rt, first, 60, until=frozenset({InstanceState.GONE}))
            second = wait_until(
                lambda: (x := ready_vm()) is not None and x != first and x, timeout=60, interval=0.1,
                what="the keeper to restart wms-01",
            )
            again = rt.store.require_instance(second)
            assert again.host == vm.host and again.ip == vm.ip and again.mac == vm.mac  # restarted in place
            assert len(services.restarts("wms-01")) == 1
        finally:
            stop.set()
            t.join(timeout=10)
        assert mon.errors == 0, mon.last_error
