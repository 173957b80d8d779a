"""The watchdog against the real libvirt test driver (in-process): no pets -> HA guests die, workers stay."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ha.watchdog import WatchdogState, expired, pet, run_watchdog
from provisioner.hypervisor.domxml import DomainSpec, build_domain_xml
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.hypervisor.testdriver import write_test_host_xml
from provisioner.interfaces import DomainState
from tests.conftest import wait_until

pytestmark = pytest.mark.libvirt


def start(hv: LibvirtHost, name: str, role: str) -> None:
    spec = DomainSpec(
        name=name,
        uuid=str(uuid.uuid4()),
        domain_type="test",
        vcpus=1,
        memory_mib=256,
        disks=(),
        serial_log=None,
        metadata={"instance_id": name, "role": role, "image": "x:1"},
    )
    hv.define_and_start(name, build_domain_xml(spec))


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[LibvirtHost]:
    h = LibvirtHost(write_test_host_xml(tmp_path / "host.xml", cpus=8, memory_mib=8192))
    yield h
    h.close()


def test_expired_rule() -> None:
    assert not expired(None, started=100.0, now=100.5, timeout_s=1.0)  # grace for the first pet
    assert expired(None, started=100.0, now=101.5, timeout_s=1.0)
    assert not expired(101.0, started=100.0, now=101.5, timeout_s=1.0)
    assert expired(101.0, started=100.0, now=102.5, timeout_s=1.0)


def test_no_pets_kill_ha_guests_only_and_pets_rearm(hv: LibvirtHost, tmp_path: Path) -> None:
    start(hv, "ce", "service")
    start(hv, "wn", "worker")
    pet_file = tmp_path / "pet"
    pet(pet_file)
    stop = threading.Event()
    st = WatchdogState()
    petting = threading.Event()
    petting.set()

    def agent() -> None:  # a healthy agent pets well inside the timeout
        while not stop.is_set():
            if petting.is_set():
                pet(pet_file)
            stop.wait(0.05)

    threads = [
        threading.Thread(target=agent, daemon=True),
        threading.Thread(
            target=run_watchdog, args=(hv, pet_file, 0.4, stop), kwargs={"state": st}, daemon=True
        ),
    ]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: st.last_check > 0, timeout=5, what="watchdog running")
        assert st.fired == 0 and hv.state("ce") is DomainState.RUNNING
        petting.clear()  # the agent hangs
        wait_until(lambda: st.fired == 1, timeout=5, what="watchdog to fire")
        assert hv.state("ce") is not DomainState.RUNNING
        assert hv.state("wn") is DomainState.RUNNING
        assert st.killed == ["ce"]
        petting.set()
        wait_until(lambda: st.armed, timeout=5, what="re-armed")
        assert st.fired == 1 and st.errors == 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
