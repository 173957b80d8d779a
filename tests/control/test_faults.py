"""Faults: agent killed mid-boot, orphans and ghosts, unreachable libvirt, Redis down."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from provisioner.control.client import ENDED, choose_image, release, submit, wait
from provisioner.model import HostState, Instance, InstanceState, Role, Tier
from tests.conftest import free_port, wait_until
from tests.control.conftest import Farm
from tests.control.test_provision import domains_for

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


def _agent_pid(farm: Farm, host: str) -> int:
    st = farm.layout.read_state()
    assert st is not None
    return st.children[f"agent-{host}"]


def _events(farm: Farm, instance_id: str) -> list[str]:
    return [e.kind for e in farm.rt.store.read_events(count=2000) if e.instance == instance_id]


def test_agent_killed_mid_boot_boots_exactly_once(test_farm: Farm) -> None:
    rt = test_farm.rt
    test_farm.hold_file.touch()
    try:
        image, vo = choose_image(rt, None, "cms")
        inst, _ = submit(rt, image, vo)
        wait_until(lambda: "fault_hold" in _events(test_farm, inst.id), 20, what="boot held after start")
        booting = rt.store.get_instance(inst.id)
        assert booting is not None and booting.state is InstanceState.BOOTING
        host = booting.host
        assert host is not None
        old_pid = _agent_pid(test_farm, host)
        os.kill(old_pid, signal.SIGKILL)
    finally:
        test_farm.hold_file.unlink()
    # The supervisor restarts the agent; its start-up reconciliation re-drives the unfinished boot.
    wait_until(lambda: _agent_pid(test_farm, host) != old_pid, 20, what="agent restarted")
    done = wait(rt, inst.id, 60)
    assert done.state is InstanceState.READY and done.host == host
    assert domains_for(test_farm, inst.id) == [(host, "running")]
    assert "redrive" in _events(test_farm, inst.id)
    claims = rt.store.claims_on(host)
    assert list(claims).count(inst.id) == 1
    release(rt, inst.id)
    assert wait(rt, inst.id, 30, until=ENDED).state is InstanceState.GONE


def test_agent_killed_mid_boot_leaks_no_overlay(test_farm: Farm, tmp_path: Path) -> None:
    """An image with a disk: the overlay made before the kill is reused, and removed on release."""
    rt = test_farm.rt
    artefacts = rt.config.storage.artefacts
    base = artefacts / "test" / "tiny-base.qcow2"
    base.parent.mkdir(parents=True, exist_ok=True)
    if not base.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    fam = {
        "name": "disk-wn",
        "kind": "worker",
        "vos": ["cms"],
        "versions": [{"version": "1.0", "disk": {"path": "test/tiny-base.qcow2", "format": "qcow2"}}],
        "channels": {"stable": "1.0"},
    }
    f = tmp_path / "disk-wn.yaml"
    f.write_text(yaml.safe_dump(fam))
    r = subprocess.run(
        [sys.executable, "-m", "provisioner.cli.main", "image", "add", str(f)],
        env=test_farm.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    rt.catalogue = type(rt.catalogue).load(rt.config.catalogue_dir, artefacts)
    overlays = rt.config.storage.overlays
    test_farm.hold_file.touch()
    try:
        image, vo = choose_image(rt, "disk-wn", "cms")
        inst, _ = submit(rt, image, vo)
        wait_until(lambda: "fault_hold" in _events(test_farm, inst.id), 20, what="boot held")
        assert sorted(p.name for p in overlays.glob(f"{inst.id}*")) == [f"{inst.id}.qcow2"]
        host = rt.store.get_instance(inst.id).host  # type: ignore[union-attr]
        old_pid = _agent_pid(test_farm, host)  # type: ignore[arg-type]
        os.kill(old_pid, signal.SIGKILL)
    finally:
        test_farm.hold_file.unlink()
    assert wait(rt, inst.id, 60).state is InstanceState.READY
    assert sorted(p.name for p in overlays.glob(f"{inst.id}*")) == [f"{inst.id}.qcow2"]
    release(rt, inst.id)
    assert wait(rt, inst.id, 30, until=ENDED).state is InstanceState.GONE
    assert list(overlays.glob(f"{inst.id}*")) == []
    assert base.exists()


def test_reconciler_destroys_orphans_and_marks_ghosts(test_farm: Farm) -> None:
    rt = test_farm.rt
    image, vo = choose_image(rt, None, "lhcb")
    inst, _ = submit(rt, image, vo)
    ready = wait(rt, inst.id, 30)
    assert ready.state is InstanceState.READY
    # Orphan: the record says gone, libvirt still runs it.
    rt.store.transition(inst.id, InstanceState.STOPPING)
    rt.store.transition(inst.id, InstanceState.GONE, reason="test: record lost")
    wait_until(lambda: domains_for(test_farm, inst.id) == [], 30, what="orphan destroyed")
    assert "orphan_destroyed" in [e.kind for e in rt.store.read_events(count=500) if e.host == ready.host]
    # Ghost: a record says ready on hv2, libvirt there has no such domain.
    now = time.time()
    ghost = Instance(
        id="ghost0000001",
        role=Role.WORKER,
        image=inst.image,
        vcpus=1,
        memory_mib=256,
        tier=Tier.WORKER,
        vo="lhcb",
        created=now,
        updated=now,
    )
    rt.store.create_instance(ghost)
    assert rt.store.claim("hv2", ghost.id, 1, 256)
    rt.store.transition(ghost.id, InstanceState.PLACED, host="hv2")
    rt.store.transition(ghost.id, InstanceState.BOOTING)
    rt.store.transition(ghost.id, InstanceState.READY)
    lost = wait(rt, ghost.id, 30, until=frozenset({InstanceState.LOST}))
    assert lost.state is InstanceState.LOST and "hv2" in lost.reason
    assert ghost.id not in rt.store.claims_on("hv2")


def test_unreachable_libvirt_is_a_clear_error_and_marks_suspect(test_farm: Farm, tmp_path: Path) -> None:
    cfg = yaml.safe_load(test_farm.layout.config_file.read_text())
    cfg["hosts"].append({"name": "hvbad", "uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"})
    cfg["timeouts"]["libvirt_call_s"] = 3
    f = tmp_path / "dynvm.yaml"
    f.write_text(yaml.safe_dump(cfg))
    from provisioner.model import Capacity, Host

    test_farm.rt.store.register_host(Host(name="hvbad", uri="x:///", capacity=Capacity(4, 4096)))
    try:
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "provisioner.cli.main", "--config", str(f), "agent", "--host", "hvbad"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.monotonic() - t0 < 30
        assert r.returncode == 5, r.stderr
        assert "nonexistent" in r.stderr and "Traceback" not in r.stderr
        # stderr is the agent's operation log (one line per operation) and then its one-line error.
        lines = r.stderr.strip().splitlines()
        assert all(re.match(r"^\S+Z (INFO|WARNING|ERROR) op=", line) for line in lines[:-1]), lines
        assert lines[-1].startswith("dynvm: error:") and "nonexistent" in lines[-1], lines
        h = test_farm.rt.store.get_host("hvbad")
        assert h is not None and h.state is HostState.SUSPECT
        assert test_farm.rt.store.list_instances(host="hvbad") == []
    finally:
        test_farm.rt.store.remove_host("hvbad")


def test_redis_down_is_a_clear_error(tmp_path: Path) -> None:
    cfg = {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "domain_type": "test"}
    f = tmp_path / "dynvm.yaml"
    f.write_text(yaml.safe_dump(cfg))
    for args in (["vm", "list"], ["worker"], ["host", "list"]):
        r = subprocess.run(
            [sys.executable, "-m", "provisioner.cli.main", "--config", str(f), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 5, (args, r.stderr)
        assert "127.0.0.1" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
