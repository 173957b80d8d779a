"""host drain / vm migrate / vm recover from the command line, on a real test-driver farm (issue 11).

A farm of its own (two hosts; the tests change host states, which other tests' farm must not see).  The
test driver cannot live-migrate, so a migration really fails in the agent and reports ``migration_failed``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.configload import load_config
from provisioner.control.client import choose_image, client_runtime, release, submit, wait
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.model import Capacity, Host, HostState, Instance, InstanceState
from provisioner.runtime import Runtime

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


@dataclass
class Farm:
    layout: FarmLayout
    rt: Runtime

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        import os

        return subprocess.run(
            [sys.executable, "-m", "provisioner.cli.main", *args],
            capture_output=True,
            text=True,
            env=dict(os.environ, DYNVM_CONFIG=str(self.layout.config_file)),
            timeout=180,
        )


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    layout = FarmLayout(tmp_path_factory.mktemp("maintfarm"))
    farm_up(layout, 2, "test", host_cpus=8, host_memory_mib=8192)
    try:
        yield Farm(layout, client_runtime(load_config(layout.config_file)))
    finally:
        farm_down(layout)


@pytest.fixture
def service_vm(farm: Farm) -> Iterator[Instance]:
    """A ready CE service VM; released afterwards, with every host back up."""
    rt = farm.rt
    image, _ = choose_image(rt, "ce", None)
    inst, _ = submit(rt, image, None, service="ce-maint", owner="test")
    inst = wait(rt, inst.id, 60)
    assert inst.state is InstanceState.READY and inst.host, inst
    yield inst
    with contextlib.suppress(Exception):
        release(rt, inst.id)
    for h in rt.store.list_hosts():
        if h.state is not HostState.UP and h.name in ("hv1", "hv2"):
            rt.store.set_host_state(h.name, HostState.UP, expected=h.state, reason="test", operator=True)


def other(inst: Instance) -> str:
    return "hv2" if inst.host == "hv1" else "hv1"


def one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "internal error" not in err and "Traceback" not in err, err
    return lines[0]


def test_migrate_wait_returns_with_the_failure(farm: Farm, service_vm: Instance) -> None:
    """Before: --wait ignored migration_failed and waited out its whole timeout (exit 6)."""
    dest = other(service_vm)
    r = farm.cli("vm", "migrate", service_vm.id, "--to", dest, "--wait", "--timeout", "90")
    line = one_line(r.stderr)
    assert r.returncode == 4 and "migration_failed" in line and dest in line, r.stderr
    now = farm.rt.store.require_instance(service_vm.id)
    assert now.state is InstanceState.READY and now.host == service_vm.host  # still where it ran


def test_failed_drain_leaves_the_host_as_it_was(farm: Farm, service_vm: Instance) -> None:
    """Before: the host stayed draining, and the refusal said the (up) source was "host is maintenance"."""
    rt, src, dst = farm.rt, service_vm.host, other(service_vm)
    assert src is not None
    rt.store.set_host_state(dst, HostState.MAINTENANCE, expected=HostState.UP, reason="test")
    r = farm.cli("host", "drain", src)
    line = one_line(r.stderr)
    assert r.returncode == 4 and f"host {src} not drained (left up)" in line, line
    assert f"other than its own host {src}" in line and f"{dst}: host is maintenance" in line
    assert f"{src}: host is maintenance" not in line
    assert rt.store.require_host(src).state is HostState.UP


def test_migrate_refusal_does_not_call_the_source_maintenance(farm: Farm, service_vm: Instance) -> None:
    rt, src, dst = farm.rt, service_vm.host, other(service_vm)
    rt.store.set_host_state(dst, HostState.MAINTENANCE, expected=HostState.UP, reason="test")
    r = farm.cli("vm", "migrate", service_vm.id)
    line = one_line(r.stderr)
    assert r.returncode == 4 and f"{src}: host is maintenance" not in line and f"{dst}: host is" in line


def test_recover_refuses_a_draining_host_or_one_without_agent(farm: Farm, service_vm: Instance) -> None:
    rt, dst = farm.rt, other(service_vm)
    rt.store.transition_from(service_vm, InstanceState.FAILED, reason="test: failed")
    rt.store.set_host_state(dst, HostState.DRAINING, expected=HostState.UP, reason="test")
    r = farm.cli("vm", "recover", service_vm.id, "--to", dst)
    assert r.returncode == 4 and f"host {dst} is draining" in one_line(r.stderr)
    # A registered host no agent serves (its lease never taken).
    rt.store.register_host(Host(name="hv9", uri="test:///default", capacity=Capacity(8, 8192)))
    try:
        r = farm.cli("vm", "recover", service_vm.id, "--to", "hv9")
        assert r.returncode == 4 and "host hv9 has no live agent" in one_line(r.stderr)
    finally:
        rt.store.remove_host("hv9")
    assert rt.store.require_instance(service_vm.id).state is InstanceState.FAILED  # nothing was started


def test_recover_refusal_on_unknown_host_is_not_found(
    farm: Farm, service_vm: Instance, tmp_path: Path
) -> None:
    rt = farm.rt
    rt.store.transition_from(service_vm, InstanceState.FAILED, reason="test: failed")
    r = farm.cli("vm", "recover", service_vm.id, "--to", "x" * 5000)
    assert r.returncode in (2, 3) and len(one_line(r.stderr)) < 300
