"""Maintenance: live-migrate one VM, drain a host (services move live, workers finish, no new placements)."""

from __future__ import annotations

import time

from provisioner.errors import ConflictError, DeadlineExceeded, DynvmError, NoCapacityError, NotFoundError
from provisioner.model import HostState, InstanceState, Role
from provisioner.runtime import Runtime
from provisioner.yamlio import short_repr

MOVABLE = frozenset({InstanceState.READY})


def pick_destination(rt: Runtime, instance_id: str, exclude: str) -> str:
    """The scheduler's choice of a new host for an existing instance (never its current host)."""
    import dataclasses

    from provisioner.control.place import policy_for, request_for
    from provisioner.scheduler import Snapshot, schedule

    inst = rt.store.require_instance(instance_id)
    full = rt.store.snapshot()
    # The scheduler does not see the excluded host at all (relabelling it "maintenance" made the refusal
    # call an up host "host is maintenance"); the message names it as the VM's own host instead.
    hosts = tuple(h for h in full.hosts if h.name != exclude)
    snap = Snapshot(hosts=hosts, instances=full.instances, taken_at=full.taken_at)
    # Plan it as a new request: the instance's own claim stays on the source until the move is done.
    req = dataclasses.replace(request_for(inst), instance_id=f"{inst.id}-mig", pinned_host=None)
    plan = schedule([req], snap, policy_for(rt))
    dest = plan.placements.get(req.instance_id)
    if dest is None or dest == exclude:
        why = plan.unplaced.get(req.instance_id)
        raise NoCapacityError(
            f"no destination for {inst.id} other than its own host {exclude or '-'}: "
            f"{why if why else 'only its own host fits'}"
        )
    return dest


def migrate(rt: Runtime, instance_id: str, dest: str | None = None) -> str:
    """Ask the VM's agent to live-migrate it; returns the destination."""
    from provisioner.messaging import MIGRATE, PRIORITY_HA, host_queue

    inst = rt.store.require_instance(instance_id)
    if inst.state not in MOVABLE or inst.host is None:
        raise ConflictError(f"vm {inst.id} is {inst.state.value}; only a ready VM can be migrated")
    if dest is None:
        dest = pick_destination(rt, inst.id, exclude=inst.host)
    elif dest == inst.host:
        raise ConflictError(f"vm {inst.id} already runs on {dest}")
    check_destination(rt, dest)
    # The epoch read here travels with the request: the agent refuses to move a VM that has been placed or
    # moved since (a redelivered or late request must not send it back where it came from).
    rt.app.send_task(
        MIGRATE, args=[inst.id, dest, inst.epoch], queue=host_queue(inst.host), priority=PRIORITY_HA
    )
    return dest


def check_destination(rt: Runtime, dest: str) -> None:
    """A host an operator named (--to) must be up and have a live agent to start or receive a VM."""
    target = rt.store.get_host(dest)
    if target is None:
        raise NotFoundError(f"host {short_repr(dest)} not found")
    if target.state is not HostState.UP:
        raise ConflictError(f"host {dest} is {target.state.value}; it takes no new VMs")
    if not rt.store.lease_alive(dest):
        raise ConflictError(f"host {dest} has no live agent (its lease expired); it cannot start VMs now")


def drain(rt: Runtime, host: str) -> dict[str, str]:
    """Refuse new placements on ``host`` and move its service VMs away live; returns {vm: destination}."""
    h = rt.store.require_host(host)
    if h.state not in (HostState.UP, HostState.DRAINING):
        raise ConflictError(f"host {host} is {h.state.value}; only an up host can be drained")
    rt.store.set_host_state(host, HostState.DRAINING, expected=h.state, reason="operator drain")
    rt.store.add_event("host_draining", host=host, message="no new placements; moving services")
    moves: dict[str, str] = {}
    services = [i for i in rt.store.list_instances(host=host, role=Role.SERVICE) if i.state in MOVABLE]
    services.sort(key=lambda i: -i.tier.rank)  # most critical first
    for inst in services:
        try:
            moves[inst.id] = migrate(rt, inst.id)
        except DynvmError as err:
            raise _drain_failed(rt, host, h.state, moves, inst.id, err) from None
    return moves


def _drain_failed(
    rt: Runtime, host: str, before: HostState, moves: dict[str, str], vm: str, err: DynvmError
) -> DynvmError:
    """A drain that cannot move a VM: undone if nothing was asked to move yet, else reported as partial."""
    cause = f"cannot move {vm}: {err.message}"
    if moves:  # some VMs are already on their way: the host must stay out of placement
        moved = ", ".join(f"{k} -> {v}" for k, v in moves.items())
        text = f"host {host} stays draining (moving {moved}); {cause}; `dynvm host undrain {host}` to undo"
    else:
        try:
            rt.store.set_host_state(
                host, before, expected=HostState.DRAINING, reason="drain failed", operator=True
            )
            text = f"host {host} not drained (left {before.value}): {cause}"
        except DynvmError as again:
            text = f"host {host} not drained, and could not be set back to {before.value} ({again}): {cause}"
    try:
        return type(err)(text)
    except TypeError:  # an error class with other arguments: the exit code of a conflict
        return ConflictError(text)


def wait_drained(rt: Runtime, host: str, timeout_s: float) -> None:
    """Until no service VM is left on ``host`` (workers may still be finishing their jobs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [
            i.id
            for i in rt.store.list_instances(host=host, role=Role.SERVICE)
            if i.state not in (InstanceState.GONE, InstanceState.FAILED, InstanceState.LOST)
        ]
        if not left:
            return
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"host {host}: services still there after {timeout_s:.0f} s: {', '.join(left)}"
            )
        time.sleep(0.1)


def recover(rt: Runtime, instance_id: str, dest: str | None = None) -> str:
    """Start a lost or failed service VM again, on another host, with its own disks (the cold path
    failover takes).  Returns the host it was placed on."""
    from provisioner.messaging import PROVISION

    inst = rt.store.require_instance(instance_id)
    if inst.role is not Role.SERVICE:
        raise ConflictError(
            f"vm {inst.id} is a worker: worker VMs are not restarted, their jobs are requeued"
        )
    if inst.state not in (InstanceState.LOST, InstanceState.FAILED):
        raise ConflictError(f"vm {inst.id} is {inst.state.value}; only a lost or failed VM is recovered")
    old = inst.host or ""
    if dest is None:
        dest = pick_destination(rt, inst.id, exclude=old)
    else:
        check_destination(rt, dest)
    rt.store.transition_from(inst, InstanceState.REQUESTED, host=dest, reason=f"recovering from {old or '-'}")
    rt.store.add_event("recovering", instance=inst.id, host=dest, message=f"was on {old or '-'}")
    rt.app.send_task(PROVISION, args=[inst.id], queue="provision")
    return dest
