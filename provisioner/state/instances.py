"""Instances: records, indexes, idempotent creation and atomic lifecycle transitions.

Truth: Redis holds what *should* run (this record); libvirt holds what runs.  Every write goes through
one Lua script so the record, its index sets and its claim never disagree.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from provisioner.errors import ConflictError, InvalidTransition, NotFoundError
from provisioner.model import CLAIMING_STATES, TRANSITIONS, Instance, InstanceState, Role
from provisioner.state.base import StoreBase, as_str_dict, guarded, pairs_to_dict
from provisioner.state.codec import instance_from_fields, instance_to_fields, update_fields
from provisioner.state.events import NewEvent, log_event, script_event_args
from provisioner.state.keys import check_id

# For each target state, the states it may be entered from (the Lua script checks membership).
_ALLOWED_FROM: dict[InstanceState, str] = {
    new: ",".join(sorted(cur.value for cur, targets in TRANSITIONS.items() if new in targets))
    for new in InstanceState
}
_CLAIMING_CSV = ",".join(sorted(s.value for s in CLAIMING_STATES))


class GateNotClosed(Exception):
    """create_instance's admission gate (an image's circuit breaker) is not closed: nothing was written."""


class AnyHost(Enum):
    """``expected_host`` not checked (None already means "the record has no host")."""

    ANY = "any"


ANY_HOST = AnyHost.ANY


@dataclass(frozen=True, slots=True)
class _Expect:
    """What a compare-and-set expects of the record; None (ANY_HOST for the host) = not checked."""

    state: InstanceState | None
    host: str | AnyHost | None
    epoch: int | None


def _conflict_message(
    iid: str, new: InstanceState | None, exp: _Expect, state: str, host: str | None, epoch: int
) -> str:
    """Name each part of the read that no longer holds, e.g. "host is hv2, expected hv1"."""
    diffs = []
    if exp.state is not None and state != exp.state.value:
        diffs.append(f"is {state}, expected {exp.state.value}")
    if exp.host is not ANY_HOST and host != exp.host:
        diffs.append(f"host is {host or '-'}, expected {exp.host or '-'}")
    if exp.epoch is not None and epoch != exp.epoch:
        diffs.append(f"epoch is {epoch}, expected {exp.epoch}")
    wanted = f" (wanted {new.value})" if new is not None else ""
    return f"instance {iid} changed since it was read: {'; '.join(diffs)}{wanted}"


class InstancesMixin(StoreBase):
    @guarded
    def create_instance(
        self,
        inst: Instance,
        idempotency_key: str | None = None,
        gate: str | None = None,
        event: NewEvent | None = None,
    ) -> tuple[Instance, bool]:
        """Store a new instance; with a key, a repeated call returns the first instance and False.

        ``gate``: a circuit-breaker hash key checked in the same script (no extra round trip on the common,
        closed path); when that breaker is not closed nothing is written and GateNotClosed is raised.
        ``event``: appended in the same step when (and only when) the record is created.
        Raises ConflictError if the id is taken by a different request.
        """
        idem = self.keys.idem(idempotency_key) if idempotency_key is not None else ""
        keys = [self.keys.inst(inst.id), idem]
        if gate is not None:
            keys.append(gate)
        if inst.host is not None:
            check_id(inst.host, "host name")
        now = time.time()
        inst = dataclasses.replace(
            inst,
            idempotency_key=idempotency_key or inst.idempotency_key,
            created=inst.created or now,
            updated=now,
        )
        n_ev, ev_args = script_event_args(event, inst.id)
        args: list[Any] = [
            inst.id,
            inst.state.value,
            inst.role.value,
            inst.host or "",
            n_ev,
            self.events_maxlen,
        ]
        args += ev_args
        for k, v in instance_to_fields(inst).items():
            args += [k, v]
        code, iid = cast(list[Any], self._run("create_instance", keys, args))
        if int(code) == -1:
            raise ConflictError(f"instance id {inst.id!r} already exists")
        if int(code) == -2:
            raise GateNotClosed(str(iid))
        if int(code) == 1:
            log_event(event, inst.id)
            return inst, True
        existing = self.get_instance(str(iid))
        if existing is None:  # deleted between the script and this read
            raise ConflictError(f"idempotency key {idempotency_key!r}: instance {iid} vanished; retry")
        return existing, False

    @guarded
    def get_instance(self, instance_id: str) -> Instance | None:
        raw = as_str_dict(self.r.hgetall(self.keys.inst(instance_id)))
        return instance_from_fields(raw) if raw else None

    @guarded
    def get_instances(self, ids: list[str]) -> dict[str, Instance | None]:
        """Several records read in one round trip (not one snapshot: each is as of its own read); None
        for an id that has no record."""
        pipe = self.r.pipeline(transaction=False)
        for iid in ids:
            pipe.hgetall(self.keys.inst(iid))
        raws = cast(list[dict[str, str]], pipe.execute())
        return {iid: (instance_from_fields(raw) if raw else None) for iid, raw in zip(ids, raws, strict=True)}

    def require_instance(self, instance_id: str) -> Instance:
        inst = self.get_instance(instance_id)
        if inst is None:
            raise NotFoundError(f"instance {instance_id!r} not found")
        return inst

    @guarded
    def instance_for_key(self, idempotency_key: str) -> Instance | None:
        iid = self.r.get(self.keys.idem(idempotency_key))
        return self.get_instance(str(iid)) if iid is not None else None

    @guarded
    def list_instances(
        self,
        host: str | None = None,
        state: InstanceState | None = None,
        role: Role | None = None,
        ended: bool = False,
    ) -> list[Instance]:
        """Instances matching every given criterion, oldest first.

        Hot by default, O(live): the records in the hot indexes that have not ended (plus lost service
        VMs, which wait for HA).  ``ended=True`` or an ended ``state`` also reads the ended records still
        within retention (cold, O(ended): provisioner.state.retention).
        """
        from provisioner.state.retention import retirable

        sets = []
        if host is not None:
            sets.append(self.keys.by_host(host))
        if state is not None:
            sets.append(self.keys.by_state(state.value))
        if role is not None:
            sets.append(self.keys.by_role(role.value))
        ids = cast(set[str], self.r.sinter(sets) if sets else self.r.smembers(self.keys.instances))
        cold = ended or (
            state is not None and state in (InstanceState.GONE, InstanceState.FAILED, InstanceState.LOST)
        )
        if cold:
            ids |= set(cast(list[str], self.r.zrange(f"{self.keys.prefix}:ended", 0, -1)))
        out = [
            i
            for i in self._load(sorted(ids))
            if (cold or not retirable(i))
            and (host is None or i.host == host)
            and (state is None or i.state is state)
            and (role is None or i.role is role)
        ]
        return out

    def _load(self, ids: list[str]) -> list[Instance]:
        pipe = self.r.pipeline(transaction=False)
        for iid in ids:
            pipe.hgetall(self.keys.inst(iid))
        out = [instance_from_fields(raw) for raw in pipe.execute() if raw]
        out.sort(key=lambda i: (i.created, i.id))
        return out

    @guarded
    def transition(
        self,
        instance_id: str,
        new_state: InstanceState,
        expected: InstanceState | None = None,
        *,
        expected_host: str | AnyHost | None = ANY_HOST,
        expected_epoch: int | None = None,
        bump_epoch: bool = False,
        release_on: str | None = None,
        event: NewEvent | None = None,
        **fields: Any,
    ) -> Instance:
        """Move an instance to ``new_state`` atomically, setting ``fields`` (None deletes a field).

        A compare-and-set: ``expected`` (state), ``expected_host`` (None = the record has no host) and
        ``expected_epoch`` are each checked when given, and a difference raises ConflictError naming what
        differed, so of two racing callers that read the same record exactly one wins, and a decision taken
        on a stale read is refused.  Callers that act on a record they read use ``transition_from``.

        Checked against provisioner.model.TRANSITIONS inside Redis: raises InvalidTransition if the table
        forbids it, NotFoundError if unknown.  The placement epoch goes up by one when the host changes or
        ``bump_epoch`` is set (a placement).  Entering a state outside CLAIMING_STATES releases the
        instance's capacity claim in the same step; ``release_on`` gives back its claim on that host in the
        same step too (a migration landing frees its source).  ``event`` is appended (and its waiters
        woken) in the same step, only if the transition happens.
        """
        fields.setdefault("updated", time.time())
        if release_on is not None:
            check_id(release_on, "host name")
        exp = _Expect(expected, expected_host, expected_epoch)
        return self._update(
            instance_id, new_state, exp, fields, bump_epoch, release_on=release_on or "", event=event
        )

    def transition_from(
        self,
        read: Instance,
        new_state: InstanceState,
        *,
        bump_epoch: bool = False,
        release_on: str | None = None,
        event: NewEvent | None = None,
        **fields: Any,
    ) -> Instance:
        """``transition`` expecting exactly the state, host and epoch of ``read`` (the record the caller
        decided on); returns the record as written, to pass to the caller's next transition."""
        return self.transition(
            read.id,
            new_state,
            read.state,
            expected_host=read.host,
            expected_epoch=read.epoch,
            bump_epoch=bump_epoch,
            release_on=release_on,
            event=event,
            **fields,
        )

    @guarded
    def update_instance_fields(self, instance_id: str, **fields: Any) -> Instance:
        """Set (or with None delete) fields other than id/state/role/epoch, atomically with the host index
        (a host change bumps the epoch)."""
        fields.setdefault("updated", time.time())
        return self._update(instance_id, None, _Expect(None, ANY_HOST, None), fields, False)

    @guarded
    def release_claim_from(self, read: Instance, host: str) -> Instance:
        """Give back ``read``'s claim on ``host`` only if the record is still exactly ``read`` (state,
        host, epoch): a claim found unjustified on a stale read may belong to a placement or a move made
        since.  Raises ConflictError (naming what differed) or NotFoundError; the record is not changed."""
        check_id(host, "host name")
        exp = _Expect(read.state, read.host, read.epoch)
        return self._update(read.id, None, exp, {}, False, release_on=host)

    def _update(
        self,
        instance_id: str,
        new_state: InstanceState | None,
        exp: _Expect,
        fields: dict[str, Any],
        bump_epoch: bool,
        release_on: str = "",
        event: NewEvent | None = None,
    ) -> Instance:
        to_set, to_del = update_fields(instance_id, fields)
        n_ev, ev_args = script_event_args(event, instance_id)
        if isinstance(exp.host, str):
            check_id(exp.host, "host name")
        args: list[Any] = [
            instance_id,
            new_state.value if new_state is not None else "",
            exp.state.value if exp.state is not None else "",
            "*" if exp.host is ANY_HOST else (exp.host or ""),
            "" if exp.epoch is None else str(int(exp.epoch)),
            "1" if bump_epoch else "0",
            _ALLOWED_FROM[new_state] if new_state is not None else "",
            _CLAIMING_CSV,
            release_on,
            len(to_set),
            n_ev,
            self.events_maxlen,
            "1" if event is not None and event.notify else "0",
        ]
        for k, v in to_set.items():
            args += [k, v]
        args += ev_args
        args += to_del
        out = cast(list[str], self._run("update_instance", [self.keys.inst(instance_id)], args))
        status, cur_state, cur_host, cur_epoch = out[0], out[1], out[2] or None, int(out[3] or 0)
        if status == "missing":
            raise NotFoundError(f"instance {instance_id!r} not found")
        if status == "conflict":
            why = _conflict_message(instance_id, new_state, exp, cur_state, cur_host, cur_epoch)
            raise ConflictError(why)
        if status == "invalid":
            assert new_state is not None
            raise InvalidTransition(f"instance {instance_id} cannot go from {cur_state} to {new_state.value}")
        log_event(event, instance_id)
        return instance_from_fields(pairs_to_dict(out[4:]))

    @guarded
    def delete_instance(self, instance_id: str) -> bool:
        """Remove the record with its indexes, idempotency key and claim (ghost cleanup)."""
        return bool(self._run("delete_instance", [self.keys.inst(instance_id)], [instance_id]))
