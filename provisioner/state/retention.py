"""Hot state is live state: ended instances leave the hot indexes and expire into a compact history.

Truth: an instance that ended (gone, failed, lost) keeps its record for ``retention.ended_s`` (``vm show``
and ``vm list --all`` read it), but it is no longer a member of ``insts`` or any ``idx:*`` set, so
snapshots, ``vm list``, ``status``, the reconciler's per-host read and placement cost O(live instances).
Cold keys: ``ended`` (zset id -> when it was retired, Redis clock) and ``history`` (a stream capped at
``retention.history_max`` entries: id, state, role, host, image, vo, owner, created, ended, reason, vcpus,
memory_mib, key), for accounting and events.

Why a separate step and not update_instance.lua: that script is the one compare-and-set of every
transition; retiring is housekeeping that may lag by one sweep (``outbox.sweep_interval_s``) without
changing any decision, because every hot reader filters ended states anyway.  A lost *service* record
stays hot (HA recovers it); a retired record that comes back to life (failed/lost -> requested/stopping)
is put back by ``revive``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from provisioner.model import Instance, InstanceState, Role
from provisioner.state.base import StoreBase, _script_source, guarded
from provisioner.state.codec import instance_from_fields

ENDED = frozenset({InstanceState.GONE, InstanceState.FAILED, InstanceState.LOST})
RETIRE_BATCH = 2000  # records per state per script call: bounds the time Redis is blocked
# States a retired record can come back to (TRANSITIONS out of failed/lost), checked for revival.
REVIVABLE_INTO = (InstanceState.REQUESTED, InstanceState.STOPPING)


def retirable(inst: Instance) -> bool:
    """Whether the record is over and leaves the hot indexes (a lost service waits for HA instead)."""
    return inst.state in ENDED and not (inst.state is InstanceState.LOST and inst.role is Role.SERVICE)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    id: str
    state: str
    fields: dict[str, str]


def run_extra(store: StoreBase, name: str, args: list[Any]) -> Any:
    """Run one of the scripts this module and the outbox add (registered on first use)."""
    if name not in store._scripts:
        store._scripts[name] = store.r.register_script(_script_source(name))
    return store._run(name, [], args)


class RetentionMixin(StoreBase):
    @guarded
    def retire_ended(self, history_max: int, batch: int = RETIRE_BATCH) -> int:
        """Move just-ended records out of the hot indexes (and into the history); how many moved."""
        total = 0
        while True:
            n = int(run_extra(self, "retire_ended", [history_max, batch]))
            total += n
            if n < batch:
                return total

    @guarded
    def purge_ended(self, retention_s: float, batch: int = RETIRE_BATCH) -> int:
        """Delete ended records retired more than ``retention_s`` ago (Redis clock); how many."""
        sec, usec = self.r.time()
        cutoff = repr(sec + usec / 1e6 - retention_s)
        total = 0
        while True:
            expired, _ = cast(list[int], run_extra(self, "purge_ended", [cutoff, batch]))
            total += int(expired)
            if int(expired) < batch:
                return total

    @guarded
    def revive(self, ids: list[str]) -> int:
        """Put retired records that are alive again back into the hot indexes; how many."""
        if not ids:
            return 0
        _, revived = cast(list[int], run_extra(self, "purge_ended", ["", 0, *ids]))
        return int(revived)

    @guarded
    def retired_among(self, ids: list[str]) -> list[str]:
        """The ids of ``ids`` that are in the cold ``ended`` set."""
        pipe = self.r.pipeline(transaction=False)
        for iid in ids:
            pipe.zscore(self._ended_key, iid)
        return [iid for iid, score in zip(ids, pipe.execute(), strict=True) if score is not None]

    @guarded
    def list_ended(self) -> list[Instance]:
        """Every ended record still within retention (cold: O(ended), for ``vm list --all``)."""
        ids = cast(list[str], self.r.zrange(self._ended_key, 0, -1))
        pipe = self.r.pipeline(transaction=False)
        for iid in ids:
            pipe.hgetall(self.keys.inst(iid))
        return [instance_from_fields(raw) for raw in pipe.execute() if raw]

    @guarded
    def read_history(self, count: int = 100) -> list[HistoryEntry]:
        """The newest ``count`` ended records of the compact history, oldest first."""
        raw = cast(list[tuple[str, dict[str, str]]], self.r.xrevrange(self._history_key, count=count))
        return [HistoryEntry(f.get("id", ""), f.get("state", ""), f) for _, f in reversed(raw)]

    @property
    def _ended_key(self) -> str:
        return f"{self.keys.prefix}:ended"

    @property
    def _history_key(self) -> str:
        return f"{self.keys.prefix}:history"
