"""Live migration of one instance from this agent's host to another (maintenance, drain).

Capacity is claimed on the destination before the move and released on the source after it, so the
VM is never unaccounted for.  While the record says ``migrating`` both hosts' reconcilers keep the domain.
"""

from __future__ import annotations

import contextlib
import logging
import time

from provisioner.agent.domain import instance_disks, spec_for
from provisioner.errors import ConflictError, DynvmError, NoCapacityError, NotFoundError
from provisioner.model import CLAIMING_STATES, Instance, InstanceState
from provisioner.runtime import Runtime, claim, resolve_image

log = logging.getLogger(__name__)


def migrate_instance(rt: Runtime, instance_id: str, dest: str, expected_epoch: int | None = None) -> None:
    """Move ``instance_id`` live to ``dest``.  ``expected_epoch``: the placement the request was made for;
    a VM placed or moved since (a late or redelivered request) is left where it is."""
    from provisioner.hypervisor.libvirt_host import LibvirtHost

    assert rt.hypervisor is not None and rt.host is not None
    inst = rt.store.get_instance(instance_id)
    if inst is None or inst.host != rt.host or inst.state is not InstanceState.READY:
        return  # already moved, released, or not in a movable state: nothing to do
    if expected_epoch is not None and inst.epoch != expected_epoch:
        rt.store.add_event(
            "migration_refused",
            instance=inst.id,
            host=rt.host,
            message=f"asked for epoch {expected_epoch}, the VM is at epoch {inst.epoch} (moved since)",
        )
        return
    dest_cfg = rt.config.host(dest)
    if dest_cfg is None:
        rt.store.add_event("migration_failed", f"{dest!r} is not configured", instance=inst.id, host=rt.host)
        raise NotFoundError(f"migrate {inst.id}: destination host {dest!r} is not configured")
    # The record says migrating before the destination is claimed, so a claim on ``dest`` is never seen
    # by dest's reconciler next to a record that does not explain it.  The epoch goes up when it lands.
    try:
        moving = rt.store.transition_from(inst, InstanceState.MIGRATING)
    except ConflictError:
        return
    if not claim(rt, dest, moving):
        with contextlib.suppress(ConflictError):
            rt.store.transition_from(moving, InstanceState.READY)
        rt.store.add_event("migration_failed", f"{dest} has no room", instance=inst.id, host=rt.host)
        raise NoCapacityError(f"migrate {inst.id}: {dest} has no room (or is not up)")
    rt.store.add_event("migrating", instance=inst.id, host=rt.host, message=f"live to {dest}")
    t0 = time.monotonic()
    target = LibvirtHost(dest_cfg.uri, call_timeout_s=rt.config.timeouts.libvirt_call_s)
    try:
        image = resolve_image(rt, inst.image)
        xml = spec_for(rt, inst, image, instance_disks(rt, inst, image), host=dest)
        rt.hypervisor.migrate(
            inst.domain_name,
            target,
            xml=xml,
            migrate_uri=dest_cfg.migration_uri,
            unsafe=rt.config.storage.unrecognised_shared,
        )
    except DynvmError as err:
        rt.store.release_claim(dest, inst.id)
        with contextlib.suppress(ConflictError):
            rt.store.transition_from(moving, InstanceState.READY)
        rt.store.add_event("migration_failed", instance=inst.id, host=rt.host, message=str(err)[:300])
        raise
    finally:
        target.close()
    _finish(rt, moving, dest, t0)


def _finish(rt: Runtime, moving: Instance, dest: str, t0: float) -> None:
    """Record the move (host changes: a new epoch) and give the source's capacity back, atomically."""
    assert rt.host is not None
    try:
        # Landed: the record moves to dest (a new epoch) and the source's claim goes, in one step.
        rt.store.transition_from(moving, InstanceState.READY, host=dest, release_on=rt.host)
    except ConflictError as err:
        # Released (or failed over) while it moved: the record no longer wants it anywhere we know of.
        # The VM now runs on ``dest``; that host's reconciler destroys it as an orphan after re-reading.
        now = rt.store.get_instance(moving.id)
        if now is None or now.host != dest or now.state not in CLAIMING_STATES:
            rt.store.release_claim(dest, moving.id)  # unless a new placement on dest holds it now
        rt.store.add_event("migration_orphaned", instance=moving.id, host=dest, message=str(err)[:300])
        return
    ms = (time.monotonic() - t0) * 1000
    rt.store.add_event(
        "migrated",
        f"from {rt.host} in {ms:.0f} ms",
        instance=moving.id,
        host=dest,
        vo=moving.vo,
        duration_s=ms / 1000,
    )
    rt.store.notify(moving.id)
