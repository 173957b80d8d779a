"""The agent's reconciliation runs in a thread of its own, apart from lease renewal, and survives errors:
a pass that fails (here: libvirt unreachable) is counted and retried, the start-up pass included, and
both are recorded in Redis (provisioner/agent/loops.py)."""

from __future__ import annotations

import time

import pytest

from provisioner.agent.loops import read_loops
from provisioner.agent.main import ReconcileLoop
from provisioner.config import Config
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.model import Capacity, Host
from provisioner.runtime import Runtime
from provisioner.state import StateStore
from tests.conftest import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


def test_reconcile_loop_survives_failing_passes(redis_url: str) -> None:
    cfg = Config.model_validate(
        {
            "redis_url": redis_url,
            "domain_type": "test",
            "hosts": [{"name": "hv1", "uri": "test:///default"}],
            "timeouts": {"reconcile_interval_s": 0.05},
        }
    )
    store = StateStore.from_url(redis_url)
    store.register_host(Host("hv1", "test:///default", capacity=Capacity(4, 4096)))
    rt = Runtime(config=cfg, store=store, catalogue=None, host="hv1")  # type: ignore[arg-type]
    rt.hypervisor = LibvirtHost("qemu+unix:///system?socket=/nonexistent/libvirt-sock", call_timeout_s=1)
    loop = ReconcileLoop(rt)
    loop.start()
    try:
        wait_until(lambda: loop.failures >= 3, 20, what="failed passes to be counted")
        assert loop.passes == 0 and "nonexistent" in loop.last_error
        assert loop._thread is not None and loop._thread.is_alive()

        def recorded() -> dict[str, str]:  # what `dynvm host show` and `dynvm ha status` read
            return read_loops(store.r, store.keys.prefix, "hv1").get("reconcile", {})

        wait_until(lambda: int(recorded().get("errors", 0)) >= 1, 20, what="a failed pass recorded")
        assert "nonexistent" in recorded()["last_error"] and recorded()["every_s"] == "0.05"
        rt.hypervisor = LibvirtHost("test:///default")  # libvirt is back
        wait_until(lambda: loop.passes >= 2, 20, what="passes to succeed again")
        wait_until(lambda: int(recorded().get("passes", 0)) >= 1, 20, what="a pass recorded")
        assert abs(float(recorded()["last_run"]) - time.time()) < 60
    finally:
        loop.stop.set()
