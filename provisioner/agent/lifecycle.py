"""Boot and release of one instance on this agent's host.

Every step checks the world first, so a redelivered task (agent killed mid-boot) never creates a second VM
or leaks an overlay: the overlay is reused when it already has the right backing file, define_and_start is a
no-op for a running domain, and the state transitions are atomic compare-and-set operations in Redis.
"""

from __future__ import annotations

import logging
import os
import time

from provisioner import oplog
from provisioner.agent.domain import instance_disks, remove_instance_files, spec_for
from provisioner.agent.ready import wait_ready
from provisioner.breaker import record_boot
from provisioner.errors import ConflictError, DynvmError, InvalidTransition, NotFoundError, PermanentError
from provisioner.model import Instance, InstanceState, Role
from provisioner.runtime import Runtime, resolve_image
from provisioner.state.events import NewEvent

log = logging.getLogger(__name__)
BOOTABLE = (InstanceState.PLACED, InstanceState.BOOTING)
STOP_ATTEMPTS = 5


def _claim_boot(rt: Runtime, instance_id: str) -> bool:
    """One boot per instance at a time in this agent (the only agent of its host).  A redelivered task
    that finds the boot still running here does nothing; after an agent restart the set is empty, so an
    instance left ``booting`` by the dead agent is booted again."""
    with rt.lock:
        if instance_id in rt.booting:
            return False
        rt.booting.add(instance_id)
        return True


def boot_instance(
    rt: Runtime, instance_id: str, final_attempt: bool = False, expected_epoch: int | None = None
) -> None:
    """Boot the instance placed on this host.  ``expected_epoch``: the placement the caller decided on
    (the reconciler's re-drive); a record placed anew since is left to its own boot request."""
    if not _claim_boot(rt, instance_id):
        return
    try:
        inst = _start_booting(rt, instance_id, expected_epoch)
        if inst is None:
            return
        try:
            _boot(rt, inst)
        except PermanentError as err:
            _fail(rt, inst, str(err), image_fault=True)
        except DynvmError as err:
            if final_attempt:
                _fail(rt, inst, str(err))
            else:
                rt.store.add_event("retry", instance=inst.id, host=rt.host, message=str(err))
                raise
    finally:
        with rt.lock:
            rt.booting.discard(instance_id)


def _start_booting(rt: Runtime, instance_id: str, expected_epoch: int | None) -> Instance | None:
    """The record moved to booting, or None when there is nothing to boot (released, moved elsewhere,
    already booted, or placed anew since ``expected_epoch``).  The common case, a placed record on this
    host, is one compare-and-set (placed, this host[, epoch]) with no read before it; anything else
    (a re-driven boot of a booting record, a conflict) reads the record and decides on what it read."""
    try:
        return rt.store.transition(
            instance_id,
            InstanceState.BOOTING,
            InstanceState.PLACED,
            expected_host=rt.host,
            expected_epoch=expected_epoch,
        )
    except (ConflictError, NotFoundError):
        pass
    read = rt.store.get_instance(instance_id)
    if read is None or read.host != rt.host or read.state not in BOOTABLE:
        return None  # released, moved elsewhere, or already booted: nothing to do
    if expected_epoch is not None and read.epoch != expected_epoch:
        return None
    try:
        return rt.store.transition_from(read, InstanceState.BOOTING)
    except ConflictError:
        return None  # someone else moved it on in the meantime


def _fault_hold(rt: Runtime, inst: Instance) -> None:
    """Fault injection for tests (kill the agent mid-boot): while the file named by
    $DYNVM_FAULT_HOLD_AFTER_START exists, the boot pauses right after the domain was started.  A file
    naming a role (``worker`` or ``service``) holds only that role's boots (a held backlog of workers
    ahead of an HA start: tests/ha/test_failover_faults.py)."""
    path = os.environ.get("DYNVM_FAULT_HOLD_AFTER_START")
    if not path or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            only = f.read().strip()
    except OSError:
        return
    if only and only != inst.role.value:
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
    if not _define_and_start(rt, inst, xml):
        return  # moved on while its disk was still held by its old copy
    libvirt_ms = (time.monotonic() - t_virt) * 1000
    oplog.event(
        "boot",
        f"{inst.image} started",
        instance=inst.id,
        host=rt.host,
        vo=inst.vo,
        duration_s=libvirt_ms / 1000,
    )
    _fault_hold(rt, inst)
    wait_ready(rt, inst, image)
    ms = (time.monotonic() - started) * 1000
    # The event and the waiters' wake-up are written by the transition itself (one step, one round trip).
    ready = NewEvent(
        "ready",
        f"{inst.image} ready in {ms:.0f} ms",
        host=rt.host,
        vo=inst.vo,
        duration_s=ms / 1000,
        notify=True,
        extra={"libvirt_ms": f"{libvirt_ms:.3f}"},
    )
    try:
        rt.store.transition_from(inst, InstanceState.READY, event=ready)
    except ConflictError:
        # Released (or re-placed) while booting: the record's new owner deals with the domain.
        return
    record_boot(rt, inst, ok=True)  # closes the image's breaker if open (issue 9); after the waiter woke


# A service's disk still held by its old copy (QEMU's image lock, a virtlockd lease): in a failover on a
# loaded machine the dead host's self-fence or watchdog may still be tearing that copy down when the
# monitor's restart deadline passes (seen: a self-fence destroy took 3.6 s).  The lock is the storage
# fencing layer doing its job; the new copy waits for it (bounded) instead of failing the service.
DISK_BUSY = ("is locked", 'failed to get "write" lock', "resource busy")
DISK_BUSY_WAIT_S = 60.0


def _define_and_start(rt: Runtime, inst: Instance, xml: str) -> bool:
    """Start the domain; a service whose disk is busy is retried (backing off to 1 s) for up to
    DISK_BUSY_WAIT_S while its record stays this boot's.  False: the record moved on meanwhile."""
    from provisioner.errors import HypervisorPermanentError

    assert rt.hypervisor is not None
    deadline = time.monotonic() + DISK_BUSY_WAIT_S
    delay = 0.1
    waiting = False
    while True:
        try:
            rt.hypervisor.define_and_start(inst.domain_name, xml)
            return True
        except HypervisorPermanentError as err:
            busy = any(t in str(err).lower() for t in DISK_BUSY)
            if inst.role is not Role.SERVICE or not busy or time.monotonic() + delay > deadline:
                raise
            if not waiting:
                waiting = True
                why = f"{err}; waiting up to {DISK_BUSY_WAIT_S:g} s for the old copy to let go"
                rt.store.add_event("disk_busy", why, instance=inst.id, host=rt.host)
        time.sleep(delay)
        delay = min(2 * delay, 1.0)
        now = rt.store.get_instance(inst.id)
        if now is None or (now.state, now.host, now.epoch) != (inst.state, inst.host, inst.epoch):
            return False


def _fail(rt: Runtime, inst: Instance, reason: str, image_fault: bool = False) -> None:
    """Leave nothing behind: domain, overlay and claim go, then the record says why, so whoever sees
    ``failed`` sees a clean host.  Only while the record is still the one this boot wrote: after a release
    or a new placement the domain (same name) could be someone else's.  Between the check and the teardown
    nobody else can start it here: this agent alone drives the host, and the boot slot is held."""
    log.warning("instance %s failed on %s: %s", inst.id, rt.host, reason)
    now = rt.store.get_instance(inst.id)
    if now is None or (now.state, now.host, now.epoch) != (inst.state, inst.host, inst.epoch):
        log.info("instance %s: not failing it, it moved on (%s)", inst.id, now.state.value if now else "gone")
        return
    _teardown(rt, inst)
    try:
        rt.store.transition_from(inst, InstanceState.FAILED, reason=reason[:500])
    except ConflictError as err:  # released meanwhile: the release's own teardown found nothing left
        log.info("instance %s: not failing it, %s", inst.id, err)
        return
    if image_fault:  # issue 9: a permanent boot failure counts for the image's circuit breaker
        record_boot(rt, inst, ok=False, reason=reason)  # (not a host's or Redis's transient trouble)
    rt.store.add_event(
        "failed", reason[:500], instance=inst.id, host=rt.host, vo=inst.vo, duration_s=oplog.since(inst)
    )
    rt.store.notify(inst.id)


def _teardown(rt: Runtime, inst: Instance, keep_service_data: bool = True) -> None:
    """The domain goes (its claim goes with the record's move to failed/gone, by compare-and-set: a
    plain release here could free a claim taken since for a new placement).  A worker's disks go too; a
    service's data disk stays unless the service itself is being released (a failed boot must never cost
    an SE its files)."""
    assert rt.hypervisor is not None and rt.host is not None
    rt.hypervisor.destroy(inst.domain_name)
    rt.hypervisor.undefine(inst.domain_name)
    if inst.role is Role.WORKER or not keep_service_data:
        remove_instance_files(rt, inst)


def _stopping(rt: Runtime, instance_id: str) -> Instance | None:
    """The record moved to ``stopping`` by compare-and-set on a fresh read (re-read when it changed under
    us, e.g. booting -> ready); None if there is nothing for this host to release."""
    for _ in range(STOP_ATTEMPTS):
        inst = rt.store.get_instance(instance_id)
        if inst is None or inst.state is InstanceState.GONE:
            return None
        if inst.host is not None and inst.host != rt.host:
            return None  # it moved: the release was re-sent to its current host
        if inst.state is InstanceState.STOPPING:
            return inst
        try:
            return rt.store.transition_from(inst, InstanceState.STOPPING)
        except InvalidTransition:
            raise
        except ConflictError:
            continue
    raise ConflictError(f"instance {instance_id} kept changing while being released; will retry")


def release_instance(rt: Runtime, instance_id: str) -> None:
    inst = _stopping(rt, instance_id)
    if inst is None:
        return
    if inst.host is not None:
        _teardown(rt, inst, keep_service_data=False)
    try:
        rt.store.transition_from(inst, InstanceState.GONE, reason="released")
    except ConflictError:
        return  # a redelivered release finished first
    rt.store.add_event(
        "released",
        f"{inst.image} released",
        instance=inst.id,
        host=rt.host,
        vo=inst.vo,
        duration_s=oplog.since(inst),
    )
    rt.store.notify(inst.id)
