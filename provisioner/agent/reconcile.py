"""Reconciliation on one host: libvirt is the truth for what runs, Redis for what should run.

Decide, then do (STYLE.md 2, 5, 16).  What is observed per instance id is classified into a key
(record phase, libvirt domain, is the record's host this host, is the record current) and the next action
is a lookup in ``TABLE``; claims on this host are looked up in ``CLAIM_TABLE``.  Every row has a test
(tests/agent/test_reconcile_table.py).

Why two reads of the records: a ghost (record says running here, libvirt has no domain) is only a ghost if
the record was read *before* libvirt was listed, and an orphan (a domain no record wants here) only if the
record was read *after*; a record that changed between the two reads (state, host or placement epoch) is a
move or placement in flight and is left for the next pass (``REPLAN``).  The do part then acts only on the
record it decided on: Redis writes are compare-and-set on that record's state, host and epoch, and a domain
is destroyed only after re-reading the record unchanged while holding the agent's per-instance boot slot
(so no boot of that instance runs here meanwhile).  A reconciler working from a slightly old read can
never act on a VM that has since moved or been placed anew.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum

from provisioner.errors import ConflictError, DynvmError, NotFoundError
from provisioner.interfaces import DomainInfo, DomainState
from provisioner.model import Instance, InstanceState
from provisioner.runtime import Runtime, boot_slot

log = logging.getLogger(__name__)
S = InstanceState


class Phase(StrEnum):
    """The record, as the reconciler sees it."""

    NONE = "none"  # no record
    PENDING = "pending"  # requested: nothing may run until it is placed and booted
    STARTING = "starting"  # placed/booting, its boot request still within the boot grace
    STALLED = "stalled"  # placed/booting past the grace (or found at agent start-up): nobody boots it
    RUNNING = "running"  # ready/draining
    MIGRATING = "migrating"  # a live migration in flight (its source and destination both keep it)
    MIG_STALLED = "mig_stalled"  # migrating past the grace (or found at start-up): nobody finishes it
    STOPPING = "stopping"  # the release task tears it down
    STOP_STALLED = "stop_stalled"  # stopping past the grace (or found at start-up): nobody releases it
    ENDED = "ended"  # gone/failed/lost


class Seen(StrEnum):
    """The instance's domain on this host, as libvirt listed it."""

    ABSENT = "absent"
    ALIVE = "alive"  # running or paused
    DOWN = "down"  # defined but shut off, crashed or in another state


class Action(StrEnum):
    KEEP = "keep"
    REPLAN = "replan"  # the record changed between our reads: decide again on the next pass
    DESTROY_ORPHAN = "destroy_orphan"  # destroy and undefine the domain here
    MARK_LOST = "mark_lost"  # record -> lost (its claim goes with it, in the same step)
    REDRIVE_BOOT = "redrive_boot"  # boot it again (idempotent)
    REDRIVE_RELEASE = "redrive_release"  # release it again (idempotent)
    SETTLE_MIGRATION = "settle_migration"  # finish or undo the move, from where libvirt says it runs


class ClaimAction(StrEnum):
    KEEP = "keep"
    RELEASE = "release"


Key = tuple[Phase, Seen, bool, bool]  # phase, seen, here (record's host is this host), current

K, D, L, B = Action.KEEP, Action.DESTROY_ORPHAN, Action.MARK_LOST, Action.REDRIVE_BOOT
R, M = Action.REDRIVE_RELEASE, Action.SETTLE_MIGRATION
_A, _V, _W = Seen.ABSENT, Seen.ALIVE, Seen.DOWN
# (phase, here) -> action for each of (absent, alive, down), when the record is current.
_ROWS: dict[tuple[Phase, bool], tuple[Action, Action, Action]] = {
    (Phase.NONE, False): (K, D, D),  # a dynvm domain without a record
    (Phase.PENDING, True): (K, D, D),  # pinned here, not placed yet: no copy may run ahead of its boot
    (Phase.PENDING, False): (K, D, D),
    (Phase.STARTING, True): (K, K, K),  # its boot request is on its way or running
    (Phase.STARTING, False): (K, D, D),  # placed elsewhere: a copy here must go
    (Phase.STALLED, True): (B, B, B),  # boot_instance reuses a running domain and waits for ready
    (Phase.STALLED, False): (K, D, D),
    (Phase.RUNNING, True): (L, K, L),  # a ghost: the record says running, libvirt disagrees
    (Phase.RUNNING, False): (K, D, D),  # the record says it runs elsewhere: a second copy here must go
    (Phase.MIGRATING, True): (K, K, K),  # source: the domain leaves when the migration lands
    (Phase.MIGRATING, False): (K, K, K),  # destination: the domain arrives before the record says so
    (Phase.MIG_STALLED, True): (M, M, M),  # the source settles it (it can see both ends)
    (Phase.MIG_STALLED, False): (K, K, K),
    (Phase.STOPPING, True): (K, K, K),  # the release task (redelivered if we die) tears it down
    (Phase.STOPPING, False): (K, D, D),
    (Phase.STOP_STALLED, True): (R, R, R),  # its release message was lost: release_instance is idempotent
    (Phase.STOP_STALLED, False): (K, D, D),
    (Phase.ENDED, True): (K, D, D),
    (Phase.ENDED, False): (K, D, D),
}
TABLE: dict[Key, Action] = {
    (phase, seen, here, current): (action if current else Action.REPLAN)
    for (phase, here), actions in _ROWS.items()
    for seen, action in zip((_A, _V, _W), actions, strict=True)
    for current in (True, False)
}
# A claim on this host for a record in this phase, with the record's host here or not (whether a boot
# a release or a move is late does not matter to its claim: no *_STALLED rows).  A pending
# record's claim stays: a control worker claims a moment before it records the placement (and a worker
# that died in between is redelivered; the record moves on, and then the claim is judged again).
CLAIM_TABLE: dict[tuple[Phase, bool], ClaimAction] = {
    (Phase.NONE, False): ClaimAction.RELEASE,
    (Phase.PENDING, True): ClaimAction.KEEP,
    (Phase.PENDING, False): ClaimAction.KEEP,
    (Phase.STARTING, True): ClaimAction.KEEP,
    (Phase.STARTING, False): ClaimAction.RELEASE,
    (Phase.RUNNING, True): ClaimAction.KEEP,
    (Phase.RUNNING, False): ClaimAction.RELEASE,
    (Phase.MIGRATING, True): ClaimAction.KEEP,  # the source's claim, released when it lands
    (Phase.MIGRATING, False): ClaimAction.KEEP,  # the destination's claim, taken before the move
    (Phase.STOPPING, True): ClaimAction.KEEP,
    (Phase.STOPPING, False): ClaimAction.RELEASE,
    (Phase.ENDED, True): ClaimAction.RELEASE,
    (Phase.ENDED, False): ClaimAction.RELEASE,
}
STALE_CLAIM_S = 60.0  # a record changed this recently may be about to explain a claim: leave it alone

_PHASE = {
    S.REQUESTED: Phase.PENDING,
    S.READY: Phase.RUNNING,
    S.DRAINING: Phase.RUNNING,
    S.MIGRATING: Phase.MIGRATING,
    S.STOPPING: Phase.STOPPING,
    S.GONE: Phase.ENDED,
    S.FAILED: Phase.ENDED,
    S.LOST: Phase.ENDED,
}
_SEEN = {DomainState.RUNNING: Seen.ALIVE, DomainState.PAUSED: Seen.ALIVE, DomainState.MISSING: Seen.ABSENT}


@dataclass(frozen=True, slots=True)
class Observation:
    """What one pass saw of one instance id on this host."""

    instance_id: str
    first: Instance | None  # from this host's index, read before libvirt was listed (None: not there)
    record: Instance | None  # read again after libvirt was listed (None: no record)
    domain: DomainInfo | None  # its dynvm domain on this host (None: absent)


@dataclass(frozen=True, slots=True)
class Decision:
    observation: Observation
    key: Key
    action: Action


def phase_of(
    rec: Instance | None, now: float, boot_grace_s: float, startup: bool, lost: bool = False
) -> Phase:
    """``lost``: this agent's own retry of the record's boot or release was lost (the broker refused it,
    provisioner.tasking): stalled now, not after the grace."""
    if rec is None:
        return Phase.NONE
    # At start-up nothing is booting or releasing in this (new) agent: what was died with the old one.
    late = startup or lost or now - rec.updated > boot_grace_s
    if rec.state in (S.PLACED, S.BOOTING):
        return Phase.STALLED if late else Phase.STARTING
    if rec.state is S.STOPPING:
        return Phase.STOP_STALLED if late else Phase.STOPPING
    if rec.state is S.MIGRATING:
        return Phase.MIG_STALLED if late else Phase.MIGRATING
    return _PHASE[rec.state]


def record_key(rec: Instance | None) -> tuple[str, str | None, int] | None:
    """What a compare-and-set compares: state, host and placement epoch."""
    return None if rec is None else (rec.state.value, rec.host, rec.epoch)


def is_current(host: str, first: Instance | None, record: Instance | None) -> bool:
    """Whether the two reads agree: the same state, host and epoch, or "not on this host" both times.

    The first read is the host's hot index, which leaves ended records out (retention): an ended record
    on this host seen only by the second read did not arrive in between (a record arrives by a placement
    or a migration landing, never in an ended state), so it counts as current."""
    if first is None:
        return record is None or record.host != host or _PHASE.get(record.state) is Phase.ENDED
    return record_key(first) == record_key(record)


def classify(host: str, obs: Observation, now: float, boot_grace_s: float, startup: bool,
             lost: frozenset[str] = frozenset()) -> Key:
    rec = obs.record
    seen = Seen.ABSENT if obs.domain is None else _SEEN.get(obs.domain.state, Seen.DOWN)
    here = rec is not None and rec.host == host
    phase = phase_of(rec, now, boot_grace_s, startup, obs.instance_id in lost)
    return (phase, seen, here, is_current(host, obs.first, rec))


def decide(host: str, obs: Observation, now: float, boot_grace_s: float, startup: bool,
           lost: frozenset[str] = frozenset()) -> Decision:
    """``lost``: instance ids whose boot or release retry this agent could not enqueue (see phase_of)."""
    key = classify(host, obs, now, boot_grace_s, startup, lost)
    return Decision(obs, key, TABLE[key])


def decide_claim(host: str, rec: Instance | None, now: float, grace_s: float = STALE_CLAIM_S) -> ClaimAction:
    """For a claim on ``host``: keep it or give it back (on the record as read; the release re-checks)."""
    if rec is not None and now - rec.updated < grace_s:
        return ClaimAction.KEEP
    phase = phase_of(rec, now, boot_grace_s=float("inf"), startup=False)
    return CLAIM_TABLE[(phase, rec is not None and rec.host == host)]


def observe(
    host: str,
    first: list[Instance],
    domains: list[DomainInfo],
    records: dict[str, Instance | None],
) -> list[Observation]:
    """One observation per instance id seen in this host's index or among its dynvm domains (foreign
    domains, without dynvm metadata, are never ours to touch).  ``records``: the second read."""
    by_first = {i.id: i for i in first if i.host == host}
    by_dom = {d.metadata["instance_id"]: d for d in domains if d.metadata.get("instance_id")}
    ids = sorted(set(by_first) | set(by_dom))
    return [Observation(i, by_first.get(i), records.get(i), by_dom.get(i)) for i in ids]


@dataclass
class Diff:
    """What a pass decided (and, from ``reconcile_host``, applied)."""

    orphans: list[str] = field(default_factory=list)  # domain names to destroy
    ghosts: list[str] = field(default_factory=list)  # instance ids whose VM is gone
    redrive: list[str] = field(default_factory=list)  # instance ids to boot again
    rereleased: list[str] = field(default_factory=list)  # instance ids to release again
    settled: list[str] = field(default_factory=list)  # instance ids whose unfinished move was settled
    replanned: list[str] = field(default_factory=list)  # changed between reads, or under the action
    claims_released: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # instance ids whose action raised (not one of ours)


def diff(
    host: str,
    domains: list[DomainInfo],
    instances: list[Instance],
    now: float,
    boot_grace_s: float,
    startup: bool,
    elsewhere: dict[str, Instance] | None = None,
) -> Diff:
    """The pure decisions as lists.  ``instances``: the records read from this host's index before libvirt
    was listed; ``elsewhere``: records read afterwards for domains found here that were not among them
    (a record absent from both is no record).  Records of ``instances`` count as re-read unchanged."""
    records: dict[str, Instance | None] = {i.id: i for i in instances if i.host == host}
    records.update(elsewhere or {})
    out = Diff()
    for obs in observe(host, instances, domains, records):
        _note(out, decide(host, obs, now, boot_grace_s, startup))
    return out


def _note(out: Diff, d: Decision) -> None:
    obs = d.observation
    if d.action is Action.DESTROY_ORPHAN:
        assert obs.domain is not None
        out.orphans.append(obs.domain.name)
    elif d.action is Action.MARK_LOST:
        out.ghosts.append(obs.instance_id)
    elif d.action is Action.REDRIVE_BOOT:
        out.redrive.append(obs.instance_id)
    elif d.action is Action.REDRIVE_RELEASE:
        out.rereleased.append(obs.instance_id)
    elif d.action is Action.SETTLE_MIGRATION:
        out.settled.append(obs.instance_id)
    elif d.action is Action.REPLAN:
        out.replanned.append(obs.instance_id)


# --- do ---------------------------------------------------------------------------------------------


def read_world(rt: Runtime) -> list[Observation]:
    """The two reads, in the order the table relies on: records, then libvirt, then records again."""
    assert rt.hypervisor is not None and rt.host is not None
    first = rt.store.list_instances(host=rt.host)
    domains = rt.hypervisor.list_domains()
    ids = {i.id for i in first} | {
        d.metadata["instance_id"] for d in domains if d.metadata.get("instance_id")
    }
    records = rt.store.get_instances(sorted(ids))
    return observe(rt.host, first, domains, records)


def reconcile_host(rt: Runtime, startup: bool = False) -> Diff:
    """One pass over this agent's host: decide every observed instance from the table and apply it."""
    assert rt.hypervisor is not None and rt.host is not None
    grace = rt.config.timeouts.provision_s
    with rt.lock:
        lost = frozenset(rt.lost_retries)
    decisions = [decide(rt.host, o, time.time(), grace, startup, lost) for o in read_world(rt)]
    with rt.lock:  # read and decided on: each is re-driven below if it still needs it, or needs it no more
        rt.lost_retries -= lost
    out = Diff()
    for d in decisions:
        if d.action is Action.KEEP:
            continue
        try:
            done = apply(rt, d)
        except Exception as err:  # a bug or a library's own error: the other instances still get this pass
            log.exception("reconcile %s: %s of %s raised", rt.host, d.action.value, d.observation.instance_id)
            out.failed.append(d.observation.instance_id)
            _report_failure(rt, d, err)
            done = False
        if done:
            _note(out, d)
        elif d.observation.instance_id not in out.failed:
            out.replanned.append(d.observation.instance_id)
    out.claims_released = release_stale_claims(rt)
    return out


def _report_failure(rt: Runtime, d: Decision, err: Exception) -> None:
    """An event for operators (Redis may be what is failing: then the log line is all there is)."""
    try:
        rt.store.add_event(
            "reconcile_error",
            f"{d.action.value}: {type(err).__name__}: {err}"[:300],
            instance=d.observation.instance_id,
            host=rt.host,
        )
    except Exception as again:  # reporting must not end the pass
        log.warning("reconcile %s: cannot record the failure: %s", rt.host, again)


def apply(rt: Runtime, d: Decision) -> bool:
    """Carry out one decision on the record it was made from; False if that record changed meanwhile
    (nothing was done: the next pass decides again on what it finds then)."""
    try:
        if d.action is Action.DESTROY_ORPHAN:
            return _destroy_orphan(rt, d.observation)
        if d.action is Action.MARK_LOST:
            return _mark_lost(rt, d.observation)
        if d.action in (Action.REDRIVE_BOOT, Action.REDRIVE_RELEASE, Action.SETTLE_MIGRATION):
            from provisioner.agent.redrive import redrive

            assert d.observation.record is not None
            redrive(rt, d.action.value, d.observation.record)
            return True
    except ConflictError as err:
        log.info("reconcile %s: %s not applied: %s", rt.host, d.action.value, err)
        return False
    except DynvmError as err:
        log.warning(
            "reconcile %s: %s of %s failed: %s", rt.host, d.action.value, d.observation.instance_id, err
        )
        return False
    return True  # KEEP / REPLAN: nothing to apply


def _destroy_orphan(rt: Runtime, obs: Observation) -> bool:
    assert rt.hypervisor is not None and obs.domain is not None
    with boot_slot(rt, obs.instance_id) as free:
        if not free:
            return False  # a boot of it is running here right now
        # A domain is not a Redis key: compare-and-set by re-reading, with no boot able to start it.
        if record_key(rt.store.get_instance(obs.instance_id)) != record_key(obs.record):
            return False
        log.warning("reconcile %s: destroying orphan domain %s", rt.host, obs.domain.name)
        rt.hypervisor.destroy(obs.domain.name)
        rt.hypervisor.undefine(obs.domain.name)
    why = (
        "no record" if obs.record is None else f"record {obs.record.state.value} on {obs.record.host or '-'}"
    )
    rt.store.add_event(
        "orphan_destroyed", instance=obs.instance_id, host=rt.host, message=f"domain {obs.domain.name}: {why}"
    )
    return True


def _mark_lost(rt: Runtime, obs: Observation) -> bool:
    assert obs.record is not None
    # Its claim on this host goes in the same atomic step (the record's host is this host: checked).
    rt.store.transition_from(obs.record, InstanceState.LOST, reason=f"VM not running on {rt.host}")
    rt.store.add_event(
        "lost", instance=obs.instance_id, host=rt.host, message="record said running; libvirt disagrees"
    )
    rt.store.notify(obs.instance_id)
    return True


def release_stale_claims(rt: Runtime) -> list[str]:
    """Claims on this host that no record explains, given back by compare-and-set on the record read."""
    assert rt.host is not None
    out = []
    claimed = rt.store.get_instances(sorted(rt.store.claims_on(rt.host)))
    for iid, rec in claimed.items():
        if decide_claim(rt.host, rec, time.time()) is ClaimAction.KEEP:
            continue
        try:
            if rec is None:
                rt.store.release_claim(rt.host, iid)  # no record: nothing can come to explain it
            else:
                rt.store.release_claim_from(rec, rt.host)
        except (ConflictError, NotFoundError):
            continue  # the record moved on since we read it: judged again next pass
        rt.store.add_event("claim_released", instance=iid, host=rt.host, message="no record justifies it")
        out.append(iid)
    return out
