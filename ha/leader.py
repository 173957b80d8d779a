"""Monitor leadership: one leader among several ``dynvm monitor`` processes, by a Redis lease with a
fencing token.

The lease key holds ``member|fence`` with a PX expiry on Redis's clock.  A member that finds no lease takes it
with a new fence (a counter only ever incremented), so a deposed leader's fence is always lower than the
current one.  Every write the leader makes goes through a Lua script that first checks the lease still
holds its own fence (``fenced()`` below), so a leader that stalled past its lease and wakes up cannot
write anything: its late writes are refused, not applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import redis

from provisioner.state.keys import check_id

# Prepended to every fenced script: returns early with {'fenced'} unless ARGV[1]'s fence leads.
FENCE_CHECK = """
local function fence_ok(lease_key, fence)
  local cur = redis.call('GET', lease_key)
  if not cur then return false end
  local sep = string.find(cur, '|', 1, true)
  return string.sub(cur, sep + 1) == fence
end
"""

_ACQUIRE = """
-- KEYS[1] lease, KEYS[2] fence counter; ARGV: member, ttl_ms.  Returns {fence, leader member}.
local cur = redis.call('GET', KEYS[1])
if not cur then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. fence, 'PX', ARGV[2])
  return {fence, ARGV[1]}
end
local sep = string.find(cur, '|', 1, true)
local member, fence = string.sub(cur, 1, sep - 1), string.sub(cur, sep + 1)
if member == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {tonumber(fence), member}
end
return {0, member}
"""

_RESIGN = (
    FENCE_CHECK
    + """
-- KEYS[1] lease; ARGV: fence.  Drops the lease only if this fence still holds it.
if fence_ok(KEYS[1], ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""
)


@dataclass(frozen=True, slots=True)
class Leadership:
    fence: int  # 0 when not the leader
    leader: str  # the member holding the lease

    @property
    def leading(self) -> bool:
        return self.fence > 0


class LeaderLease:
    """One monitor's view of the leadership lease (thread-safe through redis-py's pool)."""

    def __init__(self, r: redis.Redis, prefix: str, member: str, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"leader lease ttl {ttl_s} must be > 0")
        self.r = r
        self.member = check_id(member, "monitor member id")
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.key = f"{check_id(prefix, 'key prefix')}:ha:leader"
        self.fence_key = f"{prefix}:ha:fence"
        self._acquire = r.register_script(_ACQUIRE)
        self._resign = r.register_script(_RESIGN)

    def acquire_or_renew(self) -> Leadership:
        """Take the lease if it is free, renew it if it is ours; report who leads otherwise."""
        out = self._acquire(keys=[self.key, self.fence_key], args=[self.member, self.ttl_ms])
        fence, leader = cast(list[Any], out)
        return Leadership(int(fence), str(leader))

    def resign(self, fence: int) -> bool:
        return bool(self._resign(keys=[self.key], args=[str(fence)]))

    def current(self) -> Leadership | None:
        """Who leads now (fence > 0), or None."""
        value = self.r.get(self.key)
        if value is None:
            return None
        member, _, fence = str(value).partition("|")
        return Leadership(int(fence), member)
