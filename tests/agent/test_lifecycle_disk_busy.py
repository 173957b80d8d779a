"""A service start whose disk is still held by its old copy (QEMU's image lock, a virtlockd lease: what a
failover on a loaded machine meets while the dead host's self-fence is still tearing the old copy down)
waits for the disk, bounded, instead of failing the service; a worker's start, and a start whose record
moved on meanwhile, do not wait.  Real Redis, real libvirt test driver; the lock refusal is injected."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from provisioner.agent.lifecycle import _define_and_start
from provisioner.errors import HypervisorPermanentError
from provisioner.hypervisor.domxml import DomainSpec, build_domain_xml
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.model import Instance, InstanceState, Role
from provisioner.runtime import Runtime
from tests.agent.world import events, running_here

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
S = InstanceState


class HeldDisk(LibvirtHost):
    """The real test-driver host, refusing its first ``held`` starts as QEMU does while another process
    holds the image's write lock."""

    def __init__(self, uri: str, held: int, on_refuse: Callable[[], None] | None = None) -> None:
        super().__init__(uri)
        self.held = held
        self.on_refuse = on_refuse
        self.calls = 0

    def define_and_start(self, name: str, xml: str) -> None:
        self.calls += 1
        if self.calls <= self.held:
            if self.on_refuse is not None:
                self.on_refuse()
            raise HypervisorPermanentError(
                f"{self.uri}: define and start domain {name!r}: internal error: process exited while "
                'connecting to monitor: qemu-system-x86_64: -blockdev {...}: Failed to get "write" lock')
        super().define_and_start(name, xml)


def booting(rt: Runtime, iid: str, role: Role) -> tuple[Instance, str]:
    store = rt.store
    store.create_instance(Instance(iid, role, "se:1", 1, 256, created=time.time()))
    assert store.claim("hv1", iid, 1, 256)
    placed = store.transition_from(store.require_instance(iid), S.PLACED, bump_epoch=True, host="hv1")
    inst = store.transition_from(placed, S.BOOTING)
    spec = DomainSpec(name=inst.domain_name, uuid=str(uuid.uuid4()), domain_type="test", vcpus=1,
                      memory_mib=256, console_pty=False, metadata={"instance_id": iid})
    return inst, build_domain_xml(spec)


def with_host(rt: Runtime, hv: LibvirtHost) -> Runtime:
    rt.hypervisor = hv
    return rt


def test_a_service_waits_for_its_disk_and_starts(rt: Runtime) -> None:
    inst, xml = booting(rt, "s1", Role.SERVICE)
    hv = HeldDisk(rt.config.hosts[0].uri, held=2)
    try:
        assert _define_and_start(with_host(rt, hv), inst, xml) is True
        assert hv.calls == 3 and running_here(rt, inst.domain_name)
    finally:
        hv.close()
    assert events(rt.store, "s1").count("disk_busy") == 1


def test_a_worker_does_not_wait(rt: Runtime) -> None:
    inst, xml = booting(rt, "w1", Role.WORKER)
    hv = HeldDisk(rt.config.hosts[0].uri, held=1)
    try:
        with pytest.raises(HypervisorPermanentError, match="write"):
            _define_and_start(with_host(rt, hv), inst, xml)
        assert hv.calls == 1
    finally:
        hv.close()


def test_a_service_released_while_waiting_is_not_started(rt: Runtime) -> None:
    inst, xml = booting(rt, "s2", Role.SERVICE)

    def release() -> None:
        cur = rt.store.require_instance("s2")
        if cur.state is S.BOOTING:
            rt.store.transition_from(cur, S.STOPPING)

    hv = HeldDisk(rt.config.hosts[0].uri, held=5, on_refuse=release)
    try:
        assert _define_and_start(with_host(rt, hv), inst, xml) is False
        assert hv.calls == 1 and not running_here(rt, inst.domain_name)
    finally:
        hv.close()
