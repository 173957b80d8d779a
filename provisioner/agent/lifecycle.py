"""Boot and release of one instance on this agent's host.

Every step checks the world first, so a redelivered task (agent killed mid-boot) never creates a second VM
or leaks an overlay: the overlay is reused when it already has the right backing file, define_and_start is a
no-op for a running domain, and the state transitions are atomic compare-and-set operations in Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from provisioner.agent.domain import instance_disks, remove_instance_files, spec_for
from provisioner.agent.ready import wait_ready
from provisioner.errors import ConflictError, DynvmError, PermanentError
from provisioner.model import Instance, InstanceState, Role
from provisioner.runtime import Runtime, resolve_image

log = logging.getLogger(__name__)
BOOTABLE = (InstanceState.PLACED, InstanceState.BOOTING)


def _claim_boot(rt: Runtime, instance_id: str) -> bool:
    """One boot per instance at a time in this agent (the only agent of its host).  A redelivered task
    that finds the boot still running here does nothing; after an agent restart the set is empty, so an
    instance left ``booting`` by the dead agent is booted again."""
    with rt.lock:
        if instance_id in rt.booting:
            return False
        rt.booting.add(instance_id)
        return True


def boot_instance(rt: Runtime, instance_id: str, final_attempt: bool = False) -> None:
    if not _claim_boot(rt, instance_id):
        return
    try:
        inst = rt.store.get_instance(instance_id)
        if inst is None or inst.host != rt.host or inst.state not in BOOTABLE:
            return  # released, moved elsewhere, or already booted: nothing to do
        try:
            rt.store.transition(inst.id, InstanceState.BOOTING, expected=inst.state)
        except ConflictError:
            return  # someone else moved it on in the meantime
        try:
            _boot(rt, inst)
        except PermanentError as err:
            _fail(rt, inst, str(err))
        except DynvmError as err:
            if final_attempt:
                _fail(rt, inst, str(err))
            else:
                rt.store.add_event("retry", instance=inst.id, host=rt.host, message=str(err))
                raise
    finally:
        with rt.lock:
            rt.booting.discard(instance_id)


def _fault_hold(rt: Runtime, inst: Instance) -> None:
    """Fault injection for tests (kill the agent mid-boot): while the file named by
    $DYNVM_FAULT_HOLD_AFTER_START exists, the boot pauses right after the domain was started."""
    path = os.environ.get("DYNVM_FAULT_HOLD_AFTER_START")
    if not path or not os.path.exists(path):
        return
    rt.store.add_event("fault_hold", instance=inst.id, host=rt.host, message=f"boot held while {path} exists")
    deadline = time.monotonic() + rt.config.timeouts.provision_s
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _boot(rt: Runtime, inst: Instance) -> None:
    assert rt.hypervisor is not None and rt.host is not None
    image = resolve_image(rt, inst.image)
    started = time.monotonic()
    disks = instance_disks(rt, inst, image)
    xml = spec_for(rt, inst, image, disks)
    t_virt = time.monotonic()
    rt.hypervisor.define_and_start(inst.domain_name, xml)
    libvirt_ms = (time.monotonic() - t_virt) * 1000
    _fault_hold(rt, inst)
    wait_ready(rt, inst, image)
    try:
        rt.store.transition(inst.id, InstanceState.READY, expected=InstanceState.BOOTING)
    except ConflictError:
        # Released while booting: the release task tears the domain down; do not resurrect it.
        return
    ms = (time.monotonic() - started) * 1000
    rt.store.add_event(
        "ready",
        instance=inst.id,
        host=rt.host,
        message=f"{inst.image} ready in {ms:.0f} ms",
        libvirt_ms=f"{libvirt_ms:.3f}",
    )
    rt.store.notify(inst.id)


def _fail(rt: Runtime, inst: Instance, reason: str) -> None:
    """Leave nothing behind: domain, overlay and claim go; the record says why."""
    log.warning("instance %s failed on %s: %s", inst.id, rt.host, reason)
    _teardown(rt, inst)
    with contextlib.suppress(ConflictError):  # already released or gone
        rt.store.transition(inst.id, InstanceState.FAILED, reason=reason[:500])
    rt.store.add_event("failed", instance=inst.id, host=rt.host, message=reason[:500])
    rt.store.notify(inst.id)


def _teardown(rt: Runtime, inst: Instance, keep_service_data: bool = True) -> None:
    """Domain and claim go.  A worker's disks go too; a service's data disk stays unless the service
    itself is being released (a failed boot must never cost an SE its files)."""
    assert rt.hypervisor is not None and rt.host is not None
    rt.hypervisor.destroy(inst.domain_name)
    rt.hypervisor.undefine(inst.domain_name)
    if inst.role is Role.WORKER or not keep_service_data:
        remove_instance_files(rt, inst)
    rt.store.release_claim(rt.host, inst.id)


def release_instance(rt: Runtime, instance_id: str) -> None:
    inst = rt.store.get_instance(instance_id)
    if inst is None or inst.state is InstanceState.GONE:
        return
    if inst.host is not None and inst.host != rt.host:
        return  # it moved: the release was re-sent to its current host
    if inst.state is not InstanceState.STOPPING:
        try:
            rt.store.transition(inst.id, InstanceState.STOPPING)
        except ConflictError:
            return
    if inst.host is not None:
        _teardown(rt, inst, keep_service_data=False)
    rt.store.transition(inst.id, InstanceState.GONE, reason="released")
    rt.store.add_event("released", instance=inst.id, host=rt.host, message=f"{inst.image} released")
    rt.store.notify(inst.id)
