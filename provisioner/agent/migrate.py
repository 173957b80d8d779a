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
from provisioner.model import InstanceState
from provisioner.runtime import Runtime, claim, resolve_image

log = logging.getLogger(__name__)


def migrate_instance(rt: Runtime, instance_id: str, dest: str) -> None:
    from provisioner.hypervisor.libvirt_host import LibvirtHost

    assert rt.hypervisor is not None and rt.host is not None
    inst = rt.store.get_instance(instance_id)
    if inst is None or inst.host != rt.host or inst.state is not InstanceState.READY:
        return  # already moved, released, or not in a movable state: nothing to do
    dest_cfg = rt.config.host(dest)
    if dest_cfg is None:
        raise NotFoundError(f"migrate {inst.id}: destination host {dest!r} is not configured")
    if not claim(rt, dest, inst):
        raise NoCapacityError(f"migrate {inst.id}: {dest} has no room (or is not up)")
    try:
        rt.store.transition(inst.id, InstanceState.MIGRATING, expected=InstanceState.READY)
    except ConflictError:
        rt.store.release_claim(dest, inst.id)
        return
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
            rt.store.transition(inst.id, InstanceState.READY, expected=InstanceState.MIGRATING)
        rt.store.add_event("migration_failed", instance=inst.id, host=rt.host, message=str(err)[:300])
        raise
    finally:
        target.close()
    rt.store.transition(inst.id, InstanceState.READY, expected=InstanceState.MIGRATING, host=dest)
    rt.store.release_claim(rt.host, inst.id)
    ms = (time.monotonic() - t0) * 1000
    rt.store.add_event("migrated", instance=inst.id, host=dest, message=f"from {rt.host} in {ms:.0f} ms")
    rt.store.notify(inst.id)
