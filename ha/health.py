"""Service health: the per-VM health mark, its compare-and-set, and the pure sample counter.

Truth: the health mark lives on the instance record itself (extra fields of ``PREFIX:inst:ID``, which the
record codec ignores), valid only for the placement epoch it names:

    health          healthy | unhealthy | restart | relocate
    health_epoch    the record's epoch the mark is about (another epoch: the mark is stale = healthy)
    health_failures failed samples in a row when it was marked
    health_at       Redis time of the mark
    health_detail   the last failed sample's reason, or the keeper's decision

Who writes what (each write is one Lua compare-and-set on the record's state, host and epoch AND the mark
the writer read):

- the host's agent samples its READY service VMs by the image's health probe (``provisioner/agent/
  health.py``) and moves ``healthy <-> unhealthy`` after ``failures`` failed samples in a row;
- the leader's keeper (``ha/keeper.py``) moves ``unhealthy -> restart`` (under the image's restart limit,
  the restart counted) or ``-> relocate`` (past it), with its fencing token;
- the agent then moves the record ``ready -> stopping``, destroys the VM, and moves it ``stopping -> lost``
  (the mark stays with that epoch), and the keeper re-places the same record (same id, MAC, address,
  disks): on the same host for a restart, elsewhere for a relocation.  The re-placement bumps the epoch,
  so the old mark no longer counts.

Nothing is ever started while the old domain may run: the record becomes ``lost`` (and can only then be
re-placed) after the agent destroyed the domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import redis

from ha.leader import FENCE_CHECK
from provisioner.errors import ConflictError, NotFoundError
from provisioner.model import InstanceState
from provisioner.state.keys import check_id


class Mark(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    RESTART = "restart"  # the keeper asks the agent to destroy the VM for a restart in place
    RELOCATE = "relocate"  # ... for a relocation to another host


FIELDS = ("health", "health_epoch", "health_failures", "health_at", "health_detail")
MAX_DETAIL = 300


@dataclass(frozen=True, slots=True)
class Health:
    """A VM's health mark as read (``epoch``: the placement it is about)."""

    mark: Mark
    epoch: int
    failures: int = 0
    at: float = 0.0
    detail: str = ""

    def current(self, epoch: int) -> Mark:
        """The mark for a record at ``epoch``: a mark of another placement says nothing (healthy)."""
        return self.mark if self.epoch == epoch else Mark.HEALTHY


def parse(values: list[Any]) -> Health | None:
    """From an HMGET of FIELDS (None when there is no mark)."""
    raw = [None if v is None else str(v) for v in values]
    if raw[0] is None or raw[1] is None:
        return None
    try:
        return Health(Mark(raw[0]), int(raw[1]), int(raw[2] or 0), float(raw[3] or 0.0), raw[4] or "")
    except ValueError:
        return None  # written by a newer version: no mark we understand


_SET = (
    FENCE_CHECK
    + """
-- KEYS[1] instance hash, KEYS[2] leader lease (checked only with a fence)
-- ARGV: fence ('' = an agent's write), expected state, expected host, expected epoch,
--       allowed current marks (csv; a missing mark or one of another epoch counts as 'healthy'),
--       new mark, failures, detail
-- Returns 'ok', 'fenced', 'missing' or 'conflict:<state>|<host>|<epoch>|<mark>'.
if ARGV[1] ~= '' and not fence_ok(KEYS[2], ARGV[1]) then return 'fenced' end
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'missing' end
local host = redis.call('HGET', KEYS[1], 'host') or ''
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
local mark = redis.call('HGET', KEYS[1], 'health')
if not mark or redis.call('HGET', KEYS[1], 'health_epoch') ~= epoch then mark = 'healthy' end
local allowed = false
for m in string.gmatch(ARGV[5], '[^,]+') do if m == mark then allowed = true end end
if st ~= ARGV[2] or host ~= ARGV[3] or tonumber(epoch) ~= tonumber(ARGV[4]) or not allowed then
  return 'conflict:' .. st .. '|' .. host .. '|' .. epoch .. '|' .. mark
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'health', ARGV[6], 'health_epoch', epoch, 'health_failures', ARGV[7],
           'health_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])), 'health_detail', ARGV[8])
return 'ok'
"""
)


class HealthStore:
    """Reads and compare-and-sets the health marks on instance records."""

    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r = r
        self.prefix = check_id(prefix, "key prefix")
        self.leader_key = f"{prefix}:ha:leader"
        self._set = r.register_script(_SET)

    def key(self, instance_id: str) -> str:
        return f"{self.prefix}:inst:{check_id(instance_id, 'instance id')}"

    def get(self, instance_id: str) -> Health | None:
        return parse(cast(list[Any], self.r.hmget(self.key(instance_id), list(FIELDS))))

    def get_many(self, ids: list[str]) -> dict[str, Health]:
        pipe = self.r.pipeline(transaction=False)
        for iid in ids:
            pipe.hmget(self.key(iid), list(FIELDS))
        out: dict[str, Health] = {}
        for iid, values in zip(ids, pipe.execute(), strict=True):
            h = parse(cast(list[Any], values))
            if h is not None:
                out[iid] = h
        return out

    def set(
        self,
        instance_id: str,
        *,
        state: InstanceState,
        host: str,
        epoch: int,
        expect: frozenset[Mark],
        new: Mark,
        failures: int = 0,
        detail: str = "",
        fence: int | None = None,
    ) -> None:
        """Compare-and-set the mark; ConflictError (naming what moved), NotFoundError, or ConflictError
        'fenced' for a deposed leader."""
        args = [
            "" if fence is None else str(int(fence)),
            state.value,
            check_id(host, "host name"),
            str(int(epoch)),
            ",".join(sorted(m.value for m in expect)),
            new.value,
            str(int(failures)),
            detail.replace("\n", " ")[:MAX_DETAIL],
        ]
        out = str(self._set(keys=[self.key(instance_id), self.leader_key], args=args))
        if out == "ok":
            return
        if out == "missing":
            raise NotFoundError(f"instance {instance_id!r} not found")
        if out == "fenced":
            raise ConflictError(f"health mark of {instance_id}: fence {fence} no longer leads")
        st, h, ep, mark = out.removeprefix("conflict:").split("|")
        raise ConflictError(
            f"health mark of {instance_id}: record is {st} on {h or '-'} epoch {ep} marked {mark}; expected "
            f"{state.value} on {host} epoch {epoch} marked {'/'.join(sorted(expect))}"
        )


@dataclass(frozen=True, slots=True)
class Counter:
    """The agent's running judgement of one VM at one epoch (pure; one ``sample`` per probe result)."""

    epoch: int
    failures: int = 0  # failed samples in a row
    unhealthy: bool = False


def sample(c: Counter, ok: bool, threshold: int) -> tuple[Counter, Mark | None]:
    """Count one sample; returns the new counter and the mark to write when the verdict changes
    (``threshold`` failures in a row: unhealthy; the first success after that: healthy again)."""
    if ok:
        return Counter(c.epoch), (Mark.HEALTHY if c.unhealthy else None)
    failures = c.failures + 1
    if not c.unhealthy and failures >= threshold:
        return Counter(c.epoch, failures, True), Mark.UNHEALTHY
    return Counter(c.epoch, failures, c.unhealthy), None
