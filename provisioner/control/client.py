"""The requesting side (CLI, batch hooks): record a request, send it, wait for its outcome."""

from __future__ import annotations

import secrets
import time
from typing import Any

from provisioner.breaker import breaker_gate, check_admission
from provisioner.catalogue.model import ImageKind, ResolvedImage
from provisioner.control.sending import redis_unavailable, send_message, send_provision
from provisioner.errors import (
    ConflictError,
    DeadlineExceeded,
    NotFoundError,
    ValidationError,
)
from provisioner.model import Instance, InstanceState, Role, Tier
from provisioner.runtime import Runtime
from provisioner.state.events import NewEvent
from provisioner.state.instances import GateNotClosed

SETTLED = frozenset({InstanceState.READY, InstanceState.FAILED, InstanceState.GONE, InstanceState.LOST})
ENDED = frozenset({InstanceState.FAILED, InstanceState.GONE, InstanceState.LOST})
RELEASE_ATTEMPTS = 5  # re-reads when the record changes under a release (placed meanwhile)


def service_mac(name: str) -> str:
    """A deterministic, locally administered unicast MAC per service: it keeps its MAC (and so its DHCP
    reservation / ARP entries) wherever it runs."""
    import hashlib

    h = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def new_instance_id() -> str:
    return secrets.token_hex(6)


def choose_image(rt: Runtime, image_ref: str | None, vo: str | None) -> tuple[ResolvedImage, str | None]:
    """The image to boot and the VO it is booted for; a VO only ever gets an image that serves it."""
    from provisioner.identity import image_for_vo

    if vo is not None:
        return image_for_vo(vo, rt.catalogue, rt.config, requested=image_ref), vo
    if image_ref is None:
        raise ValidationError("give --image or --vo")
    image = rt.catalogue.resolve(image_ref)
    if image.kind is ImageKind.WORKER:
        if len(image.vos) != 1:
            raise ValidationError(f"image {image.ref} serves several VOs ({', '.join(image.vos)}): give --vo")
        return image, image.vos[0]
    return image, None


def submit(
    rt: Runtime,
    image: ResolvedImage,
    vo: str | None,
    *,
    owner: str | None = None,
    idempotency_key: str | None = None,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    tier: Tier | None = None,
    host: str | None = None,
    service: str | None = None,
    mac: str | None = None,
    ip: str | None = None,
) -> tuple[Instance, bool]:
    """Record the request (idempotent by key) and send it to the control workers."""
    spec = image.spec
    vcpus = spec.vcpus.default if vcpus is None else vcpus
    memory_mib = spec.memory_mib.default if memory_mib is None else memory_mib
    if not spec.vcpus.min <= vcpus <= spec.vcpus.max:
        raise ValidationError(
            f"vcpus={vcpus} outside {image.ref}'s bounds {spec.vcpus.min}..{spec.vcpus.max}"
        )
    if not spec.memory_mib.min <= memory_mib <= spec.memory_mib.max:
        raise ValidationError(
            f"memory={memory_mib} MiB outside {image.ref}'s bounds "
            f"{spec.memory_mib.min}..{spec.memory_mib.max}"
        )
    role = Role.WORKER if image.kind is ImageKind.WORKER else Role.SERVICE
    if ip is not None:
        import ipaddress

        try:
            ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            raise ValidationError(f"ip: {ip!r} is not an IPv4 address") from None
        if mac is None:
            mac = service_mac(service or ip)
    if tier is None:
        tier = Tier.WORKER if role is Role.WORKER else Tier(image.ha.priority.value if image.ha else "normal")
    now = time.time()
    inst = Instance(
        id=new_instance_id(),
        role=role,
        image=image.ref,
        vcpus=vcpus,
        memory_mib=memory_mib,
        tier=tier,
        vo=vo,
        owner=owner,
        idempotency_key=idempotency_key,
        service=service,
        mac=mac,
        ip=ip,
        host=host,
        anti_affinity=image.ha.anti_affinity if image.ha else None,
        created=now,
        updated=now,
    )
    # Issue 9: a worker boot passes its image's circuit breaker.  The closed breaker (the common case) is
    # checked inside the create script itself; only a breaker that is not closed costs the full admission
    # (which may let a half-open probe through, or refuse with CircuitOpenError), then the create again.
    # An idempotent hit (the job's own VM already exists) is never refused.
    gate = breaker_gate(rt, image.ref) if role is Role.WORKER else None
    # The "requested" event is written by the create script itself, only when it creates the record.
    ev = NewEvent("requested", f"{image.ref} for {vo or service or '-'}")
    try:
        inst, created = rt.store.create_instance(inst, idempotency_key=idempotency_key, gate=gate, event=ev)
    except GateNotClosed:
        with redis_unavailable(rt):  # it reads Redis directly: a Redis outage is one line, not a traceback
            check_admission(rt, image.ref)
        inst, created = rt.store.create_instance(inst, idempotency_key=idempotency_key, event=ev)
    # The record is the outbox: it is written first, and a request whose message did not go out (broker
    # down here, or lost later) is sent again by the control workers' sweeper (control/sweeper.py).  A
    # send that fails here is still the caller's error (UnavailableError, one line): a caller retrying with
    # its key gets this record back; and Redis may lose an acknowledged write in a crash or failover, so
    # "recorded" is not promised before the send went through.
    if created:
        send_provision(rt, inst.id)
    elif inst.state is InstanceState.REQUESTED and rt.store.picked_at([inst.id]).get(inst.id) is None:
        send_provision(rt, inst.id)  # a retry of a request whose message may never have left: send again
    return inst, created


def wait(
    rt: Runtime, instance_id: str, timeout_s: float, until: frozenset[InstanceState] = SETTLED
) -> Instance:
    """Block until the instance reaches a state in ``until`` (default: ready, failed, gone or lost) or the
    deadline passes.  Use ``until=ENDED`` after a release."""
    deadline = time.monotonic() + timeout_s
    first = True
    while True:
        inst = rt.store.get_instance(instance_id)
        if inst is None:
            raise NotFoundError(f"instance {instance_id} not found")
        if inst.state in until:
            return inst
        if inst.state is InstanceState.REQUESTED and not first:
            # (not on the first read, which is most often the only one: the check costs a round trip on
            # Redis's clock, and one notify-wait of at most 1 s later it runs)
            inst = _fail_if_nobody_picks_up(rt, inst)
            if inst.state in until:
                return inst
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"instance {instance_id} still {inst.state.value} after {timeout_s:.0f} s")
        rt.store.wait_notified(instance_id, min(left, 1.0))
        first = False


def _fail_if_nobody_picks_up(rt: Runtime, inst: Instance) -> Instance:
    """A request no control worker took within the pickup deadline while none is alive fails with that
    reason (compare-and-set: a worker placing it meanwhile wins).  With workers alive, their sweeper
    re-sends it instead."""
    from provisioner.control.sweeper import liveness_s

    cfg = rt.config.outbox
    if rt.store.redis_time() - (inst.updated or inst.created) <= cfg.pickup_deadline_s:
        return inst
    if rt.store.picked_at([inst.id]).get(inst.id) is not None or rt.store.workers_alive(liveness_s(cfg)):
        return inst
    reason = f"no control worker picked it up within {cfg.pickup_deadline_s:.0f} s"
    try:
        failed = rt.store.transition_from(inst, InstanceState.FAILED, reason=reason)
    except ConflictError:
        return rt.store.require_instance(inst.id)
    rt.store.add_event("failed", reason, instance=inst.id)
    return failed


def release(rt: Runtime, instance_id: str) -> Instance:
    from provisioner.messaging import RELEASE, host_queue

    for _ in range(RELEASE_ATTEMPTS):
        inst = rt.store.get_instance(instance_id)
        if inst is None:
            raise NotFoundError(f"instance {instance_id} not found")
        if inst.state is InstanceState.GONE:
            return inst
        if inst.host is not None:
            send_message(rt, RELEASE, [inst.id], host_queue(inst.host))
            return inst
        try:
            # Only if it is still unplaced: a worker placing it meanwhile wins, and we ask its host instead.
            return rt.store.transition_from(inst, InstanceState.GONE, reason="released before placement")
        except ConflictError:
            continue
    raise ConflictError(f"instance {instance_id} kept changing while being released; try again")


def client_runtime(config: Any) -> Runtime:
    from provisioner.messaging import make_app
    from provisioner.runtime import build_runtime

    rt = build_runtime(config)
    rt.app = make_app(config)
    return rt
