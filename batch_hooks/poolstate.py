"""Warm pools in Redis: per-VO settings (compare-and-set on a revision), pool membership, and the atomic
hand-over of an idle warm VM to exactly one job.

Truth (all under the installation's prefix):
  pool:<vo>          hash  min, max, idle_timeout_s, rev    (the VO's settings; absent: config defaults)
  pools              set   VOs with settings
  poolvms:<vo>       set   ids of VMs started for the pool and not yet handed to a job
A pool VM's record says tier=pool and has no owner; a job takes it with ``take_warm`` (one Lua script: the
VM leaves the set, gets the job as owner and the job attempt's idempotency key, tier=worker), so of any
number of racing prologs exactly one gets each VM and a redelivered prolog gets the same VM again.
``retire`` takes an idle VM out of the pool the same way before it is released, so a VM being scaled
down is never handed to a job.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

import redis

from batch_hooks.pools import IdleVM, PoolSettings
from provisioner.errors import ConflictError, ValidationError
from provisioner.model import Instance, InstanceState, Tier
from provisioner.state.keys import check_id

if TYPE_CHECKING:
    from provisioner.runtime import Runtime

_TAKE = """
-- KEYS[1] poolvms:<vo>, KEYS[2] idem:<job key>
-- ARGV prefix, owner, job key, need vcpus, need memory, now, image
local existing = redis.call('GET', KEYS[2])
if existing then
  local st = redis.call('HGET', ARGV[1] .. ':inst:' .. existing, 'state')
  if st and st ~= 'gone' and st ~= 'failed' and st ~= 'lost' then return {'existing', existing} end
end
local ended = {gone = true, failed = true, lost = true, stopping = true}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local k = ARGV[1] .. ':inst:' .. id
  local f = redis.call('HMGET', k, 'state', 'owner', 'tier', 'vcpus', 'memory_mib', 'image')
  if not f[1] or ended[f[1]] or f[2] or f[3] ~= 'pool' then
    redis.call('SREM', KEYS[1], id)  -- gone, ended or no longer a pool VM: not ours to hand out
  elseif f[1] == 'ready' and f[6] == ARGV[7] and tonumber(f[4]) >= tonumber(ARGV[4])
      and tonumber(f[5]) >= tonumber(ARGV[5]) then
    redis.call('SREM', KEYS[1], id)
    redis.call('HSET', k, 'owner', ARGV[2], 'idempotency_key', ARGV[3], 'tier', 'worker', 'updated', ARGV[6])
    redis.call('SET', KEYS[2], id)
    return {'taken', id}
  end
end
return {'none', ''}
"""

_RETIRE = """
-- KEYS[1] poolvms:<vo>, KEYS[2] inst:<id>; ARGV reason, now
if redis.call('SISMEMBER', KEYS[1], ARGV[3]) == 0 then return 0 end
local f = redis.call('HMGET', KEYS[2], 'owner', 'tier')
if f[1] or f[2] ~= 'pool' then return 0 end
redis.call('SREM', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], 'reason', ARGV[1], 'updated', ARGV[2])
return 1
"""

_SET = """
-- KEYS[1] pool:<vo>, KEYS[2] pools; ARGV expected rev ('' = any), min, max, idle, vo
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= rev then return {'conflict', rev} end
redis.call('HSET', KEYS[1], 'min', ARGV[2], 'max', ARGV[3], 'idle_timeout_s', ARGV[4], 'rev', rev + 1)
redis.call('SADD', KEYS[2], ARGV[5])
return {'ok', rev + 1}
"""


class PoolState:
    def __init__(self, r: redis.Redis, prefix: str, defaults: PoolSettings | None = None) -> None:
        self.r, self.prefix = r, check_id(prefix, "key prefix")
        self.defaults = defaults or PoolSettings()
        self._take = r.register_script(_TAKE)
        self._retire = r.register_script(_RETIRE)
        self._set = r.register_script(_SET)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def members_key(self, vo: str) -> str:
        return self._k("poolvms", check_id(vo, "vo"))

    # -- settings -------------------------------------------------------------------------------------
    def settings(self, vo: str) -> tuple[PoolSettings, int]:
        """(settings, revision); revision 0 = never set (the configured defaults)."""
        raw = cast(dict[str, str], self.r.hgetall(self._k("pool", check_id(vo, "vo"))))
        if not raw:
            return self.defaults, 0
        try:
            s = PoolSettings(int(raw["min"]), int(raw["max"]), float(raw["idle_timeout_s"]))
        except (KeyError, ValueError, ValidationError):
            return PoolSettings(), int(raw.get("rev", "0") or 0)  # unreadable: no pool, until set again
        return s, int(raw.get("rev", "0"))

    def set_settings(self, vo: str, s: PoolSettings, expected_rev: int | None) -> int:
        """Write ``s`` if the settings are still at ``expected_rev`` (None: unconditionally); the new rev."""
        keys = [self._k("pool", check_id(vo, "vo")), self._k("pools")]
        exp = "" if expected_rev is None else str(expected_rev)
        status, rev = cast(list[Any], self._set(keys=keys, args=[exp, s.min, s.max, s.idle_timeout_s, vo]))
        if status == "conflict":
            raise ConflictError(f"pool {vo}: settings changed meanwhile (now revision {rev}, "
                                f"read {expected_rev}); read them again")
        return int(rev)

    def vos(self) -> list[str]:
        return sorted(cast(set[str], self.r.smembers(self._k("pools"))))

    # -- membership -----------------------------------------------------------------------------------
    def add_member(self, vo: str, instance_id: str) -> None:
        self.r.sadd(self.members_key(vo), check_id(instance_id, "instance id"))

    def members(self, vo: str) -> list[str]:
        return sorted(cast(set[str], self.r.smembers(self.members_key(vo))))

    def take_warm(self, vo: str, image: str, owner: str, job_key: str, vcpus: int,
                  memory_mib: int) -> tuple[str, bool] | None:
        """Hand one ready idle pool VM of ``vo`` running ``image`` (at least this big) to the job:
        (instance id, True), or the VM this job attempt already has: (id, False), or None when the pool has
        none ready."""
        keys = [self.members_key(vo), self._k("idem", check_id(job_key, "job key"))]
        args: list[Any] = [self.prefix, owner, job_key, vcpus, memory_mib, time.time(), image]
        status, iid = cast(list[str], self._take(keys=keys, args=args))
        if status == "none":
            return None
        return iid, status == "taken"

    def retire(self, vo: str, instance_id: str, reason: str) -> bool:
        """Take an idle VM out of the pool (so no job can take it) before it is released; False if a job
        took it first or it is no longer in the pool."""
        keys = [self.members_key(vo), self._k("inst", check_id(instance_id, "instance id"))]
        return bool(self._retire(keys=keys, args=[reason[:200], time.time(), instance_id]))


def pool_view_parts(members: list[Instance]) -> tuple[tuple[IdleVM, ...], int]:
    """(idle ready VMs, booting count) of a pool's member records.  An idle VM's last update is the moment
    it became ready (nothing else writes an unowned pool VM's record), so ``updated`` is its idle-since."""
    idle: list[IdleVM] = []
    booting = 0
    for inst in members:
        if inst.owner is not None or inst.tier is not Tier.POOL:
            continue
        if inst.state is InstanceState.READY:
            idle.append(IdleVM(inst.id, inst.updated))
        elif inst.state in (InstanceState.REQUESTED, InstanceState.PLACED, InstanceState.BOOTING):
            booting += 1
    return tuple(idle), booting


def take_warm_for_job(rt: Runtime, vo: str, image: str, owner: str, job_key: str, vcpus: int,
                      memory_mib: int) -> Instance | None:
    """The prolog's warm-pool hit: a ready idle pool VM of the job's VO and image, now the job's; None when
    the pool has none (the job gets a cold VM).  A redelivered prolog gets the VM it already has."""
    from provisioner.breaker import redis_errors

    p = rt.config.pools
    ps = PoolState(rt.store.r, rt.store.keys.prefix, PoolSettings(p.min, p.max, p.idle_timeout_s))
    with redis_errors(rt.config.redis_url):
        got = ps.take_warm(vo, image, owner, job_key, vcpus, memory_mib)
    if got is None:
        return None
    inst = rt.store.get_instance(got[0])
    if inst is None or inst.state is not InstanceState.READY:
        return None  # an earlier delivery's cold VM, still booting: the normal (idempotent) path waits for it
    if got[1]:
        rt.store.add_event("pool_hit", f"{owner} took a warm VM", instance=inst.id, vo=vo)
    return inst
