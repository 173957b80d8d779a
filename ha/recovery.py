"""Recovery records: one persisted record per dead host, moved through named steps by the leader monitor.

Exactly-once in effect (masakari's engine is the model): a record is opened only if none is open for the
host (duplicate suppression), every step change is a compare-and-set on the expected step AND the
leader's fencing token (a deposed leader's late write is refused), and a new leader resumes an open record
at the step it reached.  Each step's time comes from Redis's clock, so ``dynvm events`` and ``ha status`` can
show the failover timeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import redis

from ha.leader import FENCE_CHECK
from provisioner.errors import ConflictError
from provisioner.state.keys import check_id


class Step(StrEnum):
    OPEN = "open"  # host declared dead
    FENCED = "fenced"  # its old copies are provably gone (self-fence deadline, storage lease, fence command)
    PLANNED = "planned"  # placements for its service VMs committed atomically
    STARTED = "started"  # boots sent to the survivors
    CONFIRMED = "confirmed"  # every service VM ready by its probe
    CLOSED = "closed"


STEP_TRANSITIONS: dict[Step, frozenset[Step]] = {
    Step.OPEN: frozenset({Step.FENCED, Step.CLOSED}),
    Step.FENCED: frozenset({Step.PLANNED, Step.CLOSED}),
    Step.PLANNED: frozenset({Step.STARTED, Step.PLANNED, Step.CLOSED}),  # re-plan what did not fit
    Step.STARTED: frozenset({Step.CONFIRMED, Step.PLANNED, Step.CLOSED}),  # a start failed: re-plan it
    Step.CONFIRMED: frozenset({Step.CLOSED}),
    Step.CLOSED: frozenset(),
}
_ALLOWED_FROM = {
    new: ",".join(sorted(cur.value for cur, nxt in STEP_TRANSITIONS.items() if new in nxt)) for new in Step
}

_OPEN = (
    FENCE_CHECK
    + """
-- KEYS[1] record, KEYS[2] open set, KEYS[3] leader lease; ARGV: fence, host, reason
if not fence_ok(KEYS[3], ARGV[1]) then return 'fenced' end
local cur = redis.call('HGET', KEYS[1], 'step')
if cur and cur ~= 'closed' then return 'exists' end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'host', ARGV[2], 'step', 'open', 'fence', ARGV[1], 'reason', ARGV[3],
           't_open', now, 'updated', now, 'detail', '{}')
redis.call('SADD', KEYS[2], ARGV[2])
return 'ok'
"""
)

_STEP = (
    FENCE_CHECK
    + """
-- KEYS[1] record, KEYS[2] open set, KEYS[3] leader lease
-- ARGV: fence, host, expected step, new step, allowed-from csv, detail json ('' = keep)
if not fence_ok(KEYS[3], ARGV[1]) then return 'fenced' end
local cur = redis.call('HGET', KEYS[1], 'step')
if not cur then return 'missing' end
if cur ~= ARGV[3] then return 'conflict:' .. cur end
local allowed = false
for s in string.gmatch(ARGV[5], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return 'invalid:' .. cur end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'step', ARGV[4], 'fence', ARGV[1], 'updated', now, 't_' .. ARGV[4], now)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'detail', ARGV[6]) end
if ARGV[4] == 'closed' then redis.call('SREM', KEYS[2], ARGV[2]) end
return 'ok'
"""
)


class FencedOut(ConflictError):
    """This monitor is no longer the leader (its fencing token was superseded): nothing was written."""

    code = "fenced"


@dataclass(slots=True)
class Recovery:
    host: str
    step: Step
    fence: int
    reason: str = ""
    times: dict[str, float] = field(default_factory=dict)  # step -> Redis time it was reached
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Recovery:
        return cls(
            host=f["host"],
            step=Step(f["step"]),
            fence=int(f.get("fence", "0")),
            reason=f.get("reason", ""),
            times={k[2:]: float(v) for k, v in f.items() if k.startswith("t_")},
            detail=json.loads(f.get("detail") or "{}"),
        )


class RecoveryStore:
    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r = r
        self.prefix = check_id(prefix, "key prefix")
        self.open_set = f"{prefix}:ha:recoveries"
        self.lease = f"{prefix}:ha:leader"
        self._open = r.register_script(_OPEN)
        self._step = r.register_script(_STEP)

    def key(self, host: str) -> str:
        return f"{self.prefix}:ha:recovery:{check_id(host, 'host name')}"

    def open(self, host: str, fence: int, reason: str) -> bool:
        """Open a record for ``host``; False if one is already open (a duplicate death event)."""
        out = self._open(keys=[self.key(host), self.open_set, self.lease], args=[fence, host, reason[:300]])
        if out == "fenced":
            raise FencedOut(f"fence {fence} no longer leads: recovery of {host} not opened")
        return bool(out == "ok")

    def advance(
        self, host: str, fence: int, expected: Step, new: Step, detail: dict[str, Any] | None = None
    ) -> None:
        """Compare-and-set the record's step (and fence); raises FencedOut / ConflictError otherwise."""
        payload = json.dumps(detail, sort_keys=True) if detail is not None else ""
        out = cast(
            str,
            self._step(
                keys=[self.key(host), self.open_set, self.lease],
                args=[fence, host, expected.value, new.value, _ALLOWED_FROM[new], payload],
            ),
        )
        if out == "ok":
            return
        if out == "fenced":
            raise FencedOut(f"fence {fence} no longer leads: recovery of {host} stays {expected.value}")
        if out == "missing":
            raise ConflictError(f"no recovery record for {host}")
        what, _, cur = out.partition(":")
        if what == "conflict":
            raise ConflictError(f"recovery of {host} is {cur}, expected {expected.value}")
        raise ConflictError(f"recovery of {host} cannot go from {cur} to {new.value}")

    def get(self, host: str) -> Recovery | None:
        raw = cast(dict[str, str], self.r.hgetall(self.key(host)))
        return Recovery.from_fields(raw) if raw else None

    def open_records(self) -> list[Recovery]:
        """Records a (new) leader must resume, oldest first."""
        hosts = sorted(cast(set[str], self.r.smembers(self.open_set)))
        recs = [r for r in (self.get(h) for h in hosts) if r is not None]
        return sorted(recs, key=lambda r: r.times.get("open", 0.0))
