"""Live migration of one instance from this agent's host to another (maintenance, drain).

Capacity is claimed on the destination before the move and released on the source after it, so the
VM is never unaccounted for.  While the record says ``migrating`` both hosts' reconcilers keep the domain.

A move can be cut short between its steps: the agent killed during the libvirt migration (its MIGRATE
message is redelivered) or Redis gone when the landing is written (the task's retry).  A request that finds
its record still ``migrating`` from this host therefore settles the move first (:func:`settle`), from
where libvirt says the guest runs: here only (it never left: back to ready, then the move is tried again),
at the destination only (it landed: the landing is written now), nowhere (lost), or anything else (still
unsettled: retried later).  The reconciler does the same for a record left migrating past the grace with
no request at all (:func:`settle_stalled`).
"""

from __future__ import annotations

import contextlib
import logging
import time

from provisioner.agent.domain import instance_disks, spec_for
from provisioner.errors import ConflictError, DynvmError, NoCapacityError, NotFoundError
from provisioner.model import CLAIMING_STATES, Instance, InstanceState
from provisioner.runtime import Runtime, boot_slot, claim, resolve_image

log = logging.getLogger(__name__)


def migrate_instance(rt: Runtime, instance_id: str, dest: str, expected_epoch: int | None = None) -> None:
    """Move ``instance_id`` live to ``dest``.  ``expected_epoch``: the placement the request was made for;
    a VM placed or moved since (a late or redelivered request) is left where it is.

    Holds the instance's slot in this agent throughout: a copy of the request delivered while the move
    runs (the broker redelivers a message unacknowledged for its visibility timeout) returns at once
    instead of taking the running move for an unfinished one."""
    with boot_slot(rt, instance_id) as free:
        if free:
            _migrate(rt, instance_id, dest, expected_epoch)


def _migrate(rt: Runtime, instance_id: str, dest: str, expected_epoch: int | None) -> None:
    from provisioner.hypervisor.libvirt_host import LibvirtHost

    assert rt.hypervisor is not None and rt.host is not None
    inst = rt.store.get_instance(instance_id)
    if inst is not None and inst.host == rt.host and inst.state is InstanceState.MIGRATING:
        if expected_epoch is not None and inst.epoch != expected_epoch:
            return
        inst = settle(rt, inst, dest)  # a redelivered or retried request of a move begun before
        if inst is None:
            return
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


def settle(rt: Runtime, moving: Instance, dest: str | None) -> Instance | None:
    """Settle a move of ``moving`` (migrating from this host) that was cut short, from where the guest runs.
    Returns the record back at ready on this host (the move may be tried again), or None when there is
    nothing left to do (it landed, or it is lost).  Raises a transient error while it is unsettled."""
    from provisioner.errors import HypervisorError
    from provisioner.hypervisor.libvirt_host import LibvirtHost
    from provisioner.interfaces import DomainState

    assert rt.hypervisor is not None and rt.host is not None
    here = rt.hypervisor.state(moving.domain_name)
    there = DomainState.MISSING
    dest_cfg = rt.config.host(dest) if dest is not None else None
    if dest_cfg is not None:
        target = LibvirtHost(dest_cfg.uri, call_timeout_s=rt.config.timeouts.libvirt_call_s)
        try:
            there = target.state(moving.domain_name)
        finally:
            target.close()
    gone = (DomainState.MISSING, DomainState.SHUTOFF)
    where = f"here {here.value}, on {dest or '?'} {there.value}"
    if here is DomainState.RUNNING and there in gone:  # it never left (or came back): undo the move
        if dest is not None:
            rt.store.release_claim(dest, moving.id)
        back = rt.store.transition_from(moving, InstanceState.READY)
        rt.store.add_event("migration_reverted", f"unfinished move to {dest or '?'}: {where}",
                           instance=moving.id, host=rt.host)
        return back
    if here is DomainState.MISSING and there is DomainState.RUNNING and dest is not None:  # it landed
        rt.store.add_event("migration_settled", f"landed on {dest}, written late: {where}",
                           instance=moving.id, host=rt.host)
        _finish(rt, moving, dest, time.monotonic())
        return None
    if here in gone and there in gone:  # nowhere: the record must not say it runs
        if dest is not None:
            rt.store.release_claim(dest, moving.id)
        rt.store.transition_from(moving, InstanceState.LOST, reason=f"lost during a live migration ({where})")
        rt.store.add_event("lost", f"lost during a live migration: {where}", instance=moving.id, host=rt.host)
        rt.store.notify(moving.id)
        return None
    raise HypervisorError(f"migration of {moving.id} to {dest or '?'} not settled yet: {where}")


def settle_stalled(rt: Runtime, moving: Instance) -> None:
    """For the reconciler: a record left migrating from this host past the grace with no request to finish
    it.  The destination is the other host holding a claim for it (none: the move never got that far)."""
    assert rt.host is not None
    dests = [h.name for h in rt.config.hosts if h.name != rt.host and moving.id in rt.store.claims_on(h.name)]
    dest = dests[0] if len(dests) == 1 else None
    if len(dests) > 1:
        raise ConflictError(f"migration of {moving.id}: claims on {', '.join(dests)}; settle it by hand")
    with boot_slot(rt, moving.id) as free:
        if not free:
            return  # this agent is moving it right now (a long migration): not stalled
        now = rt.store.get_instance(moving.id)
        if now is None or (now.state, now.host, now.epoch) != (moving.state, moving.host, moving.epoch):
            return  # it moved on since the reconciler read it
        settle(rt, now, dest)
