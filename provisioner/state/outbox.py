"""What the control workers' sweeper (provisioner.control.sweeper) keeps in Redis.

Truth of a request is its record (written first, the outbox); these keys only say what happened to its
message: ``picked:ID`` (when a control worker last started on it), ``resend:ID`` (a slot that rate-limits
re-sends, its TTL doubling per re-send, count in ``resends:ID``), ``workers`` (zset worker -> last sweep,
Redis clock), ``workers:since`` (since when some control worker has been alive without a gap) and
``sweeper`` (hash: the last run of any sweeper: worker, time, counts, last error).
"""

from __future__ import annotations

from typing import Any, cast

from provisioner.model import Instance
from provisioner.state.base import StoreBase, guarded, pairs_to_dict
from provisioner.state.codec import instance_from_fields
from provisioner.state.keys import check_id
from provisioner.state.retention import run_extra

PICKED_TTL_S = 2 * 86400


class OutboxMixin(StoreBase):
    def _ok(self, kind: str, iid: str) -> str:
        return f"{self.keys.prefix}:{kind}:{check_id(iid, 'instance id')}"

    @guarded
    def redis_time(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1e6

    @guarded
    def pick_up(self, instance_id: str) -> Instance | None:
        """mark_picked and get_instance in one round trip (pick_up.lua): what a control worker does first."""
        check_id(instance_id, "instance id")
        raw = pairs_to_dict(cast(list[str], run_extra(self, "pick_up", [instance_id, PICKED_TTL_S])))
        return instance_from_fields(raw) if raw else None

    @guarded
    def mark_picked(self, instance_id: str) -> None:
        """A control worker started on this request (its message arrived)."""
        sec, usec = self.r.time()
        self.r.set(self._ok("picked", instance_id), repr(sec + usec / 1e6), ex=PICKED_TTL_S)

    @guarded
    def picked_at(self, ids: list[str]) -> dict[str, float | None]:
        if not ids:
            return {}
        raw = cast(list[str | None], self.r.mget([self._ok("picked", i) for i in ids]))
        return {i: (float(v) if v is not None else None) for i, v in zip(ids, raw, strict=True)}

    @guarded
    def take_resend_slot(self, instance_id: str, base_s: float, cap_s: float = 60.0) -> bool:
        """True for exactly one caller per slot: whoever re-sends this instance's message now.  The slot
        lasts base_s * 2**n (capped), n = re-sends so far, so a long backlog is not duplicated endlessly."""
        n = int(cast(str | None, self.r.get(self._ok("resends", instance_id))) or 0)
        ttl_ms = max(1, int(min(cap_s, base_s * 2 ** min(n, 20)) * 1000))
        if not self.r.set(self._ok("resend", instance_id), "1", nx=True, px=ttl_ms):
            return False
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(self._ok("resends", instance_id))
        pipe.expire(self._ok("resends", instance_id), PICKED_TTL_S)
        pipe.execute()
        return True

    @guarded
    def worker_heartbeat(self, name: str, liveness_s: float) -> tuple[float, float]:
        """Record that control worker ``name`` is alive; (now, since when workers have been alive)."""
        now, since = cast(
            list[str], run_extra(self, "heartbeat", [check_id(name, "worker name"), liveness_s])
        )
        return float(now), float(since)

    @guarded
    def workers_alive(self, liveness_s: float) -> int:
        """How many control workers swept within ``liveness_s`` (Redis clock)."""
        now = self.redis_time()
        return int(self.r.zcount(f"{self.keys.prefix}:workers", now - liveness_s, "+inf"))

    @guarded
    def record_sweep(self, fields: dict[str, Any]) -> None:
        self.r.hset(f"{self.keys.prefix}:sweeper", mapping={k: str(v) for k, v in fields.items()})

    @guarded
    def sweeper_status(self) -> dict[str, str]:
        return cast(dict[str, str], self.r.hgetall(f"{self.keys.prefix}:sweeper"))
