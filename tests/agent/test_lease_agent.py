"""Host liveness with real agents (test-driver farm of this module: Redis, supervisor, two agents, worker).

- A second agent for a host whose agent is alive exits 4 before touching libvirt or any record
  (reproduced: it ran its start-up reconcile and had hv1's VMs marked lost and destroyed).
- A restarted agent renews its lease before re-driving unfinished boots, and keeps renewing while a
  re-driven boot hangs (today: no lease until the start-up re-drive finished).
- Placement never picks a host without a live lease (reproduced: VMs placed on a left-over `up` host
  stayed `placed` forever).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.configload import load_config
from provisioner.control.client import ENDED, choose_image, client_runtime, release, submit, wait
from provisioner.control.inventory import host_inventory
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.model import Capacity, Host, InstanceState
from provisioner.runtime import Runtime
from tests.conftest import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


@dataclass
class LeaseFarm:
    layout: FarmLayout
    rt: Runtime
    hold: Path

    def agent_pid(self, host: str) -> int | None:
        st = self.layout.read_state()
        return st.children.get(f"agent-{host}") if st is not None else None

    def events(self, since: str | None = None) -> list[tuple[str, str | None, str | None]]:
        return [(e.kind, e.host, e.instance) for e in self.rt.store.read_events(count=5000, since_id=since)]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeaseFarm]:
    base = tmp_path_factory.mktemp("leasefarm")
    hold = base / "hold-boot"
    os.environ["DYNVM_FAULT_HOLD_AFTER_START"] = str(hold)  # read by the agents the supervisor starts
    layout = FarmLayout(base)
    try:
        farm_up(layout, 2, "test", host_cpus=8, host_memory_mib=8192)
    finally:
        del os.environ["DYNVM_FAULT_HOLD_AFTER_START"]
    rt = client_runtime(load_config(layout.config_file))
    yield LeaseFarm(layout, rt, hold)
    farm_down(layout)


def _last_event_id(f: LeaseFarm) -> str:
    ev = f.rt.store.read_events(count=1)
    return ev[-1].id if ev else "0-0"


def test_second_agent_for_a_live_host_exits_4_and_touches_nothing(farm: LeaseFarm) -> None:
    rt = farm.rt
    image, vo = choose_image(rt, None, "cms")
    inst, _ = submit(rt, image, vo, host="hv1")
    assert wait(rt, inst.id, 30).state is InstanceState.READY
    holder = rt.store.lease_holder("hv1")
    epoch = rt.store.require_host("hv1").epoch
    mark = _last_event_id(farm)
    env = dict(os.environ, DYNVM_CONFIG=str(farm.layout.config_file))
    r = subprocess.run(
        [sys.executable, "-m", "provisioner.cli.main", "agent", "--host", "hv1"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert r.returncode == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "hv1" in lines[0] and "lease" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    # Nothing was touched: the VM runs, its record is ready, the host was not re-registered, no events.
    assert rt.store.require_instance(inst.id).state is InstanceState.READY
    doms = [d for d in host_inventory(rt, "hv1") if d["instance_id"] == inst.id]
    assert [d["state"] for d in doms] == ["running"]
    assert rt.store.require_host("hv1").epoch == epoch
    assert [e for e in farm.events(mark) if e[1] == "hv1"] == []
    assert rt.store.lease_holder("hv1") == holder
    release(rt, inst.id)
    assert wait(rt, inst.id, 30, until=ENDED).state is InstanceState.GONE


def test_restarted_agent_renews_before_and_while_re_driving(farm: LeaseFarm) -> None:
    rt = farm.rt
    ttl = rt.config.detection_classes[rt.config.host("hv2").detection_class].lease_ttl_s  # type: ignore[union-attr]
    farm.hold.touch()
    try:
        image, vo = choose_image(rt, None, "cms")
        inst, _ = submit(rt, image, vo, host="hv2")

        def holds() -> int:
            return sum(1 for k, _, i in farm.events() if k == "fault_hold" and i == inst.id)

        wait_until(lambda: holds() >= 1, 30, what="boot held after start")
        old_pid, old_token = farm.agent_pid("hv2"), rt.store.lease_holder("hv2")
        assert old_pid is not None and old_token is not None
        os.kill(old_pid, signal.SIGKILL)
        # The new agent holds the lease while its start-up re-drive is still stuck in the held boot.
        wait_until(
            lambda: rt.store.lease_holder("hv2") not in (None, old_token), 30, what="the new agent's lease"
        )
        wait_until(lambda: holds() >= 2, 30, what="the re-driven boot to be held again")
        token = rt.store.lease_holder("hv2")
        seen = rt.store.require_host("hv2").last_seen
        # Observe three TTLs with the re-drive blocked: the lease never lapses and last_seen moves on.
        end = time.monotonic() + 3 * ttl
        while time.monotonic() < end:
            assert rt.store.lease_holder("hv2") == token, "lease lapsed while a boot was re-driven"
            time.sleep(0.05)  # not synchronisation: the sampling pace of a must-never-happen check
        assert rt.store.require_host("hv2").last_seen > seen
        assert rt.store.require_instance(inst.id).state is InstanceState.BOOTING
    finally:
        farm.hold.unlink(missing_ok=True)
    assert wait(rt, inst.id, 60).state is InstanceState.READY
    release(rt, inst.id)
    assert wait(rt, inst.id, 30, until=ENDED).state is InstanceState.GONE


def test_placement_skips_a_host_without_a_live_lease(farm: LeaseFarm) -> None:
    """A left-over host (up, the emptiest, no agent) must not receive VMs."""
    rt = farm.rt
    rt.store.register_host(Host("hv9", "test:///default", capacity=Capacity(64, 65536)))
    try:
        image, vo = choose_image(rt, None, "lhcb")
        insts = [submit(rt, image, vo)[0] for _ in range(3)]
        done = [wait(rt, i.id, 30) for i in insts]
        assert [d.state for d in done] == [InstanceState.READY] * 3
        assert {d.host for d in done} <= {"hv1", "hv2"}
        for i in insts:
            release(rt, i.id)
        for i in insts:
            wait(rt, i.id, 30, until=ENDED)
    finally:
        rt.store.remove_host("hv9")
