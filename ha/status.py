"""What ``dynvm ha status`` shows: hosts with lease ages (Redis clock) and their agents' late loops, the
leader and every monitor's heartbeat, open recoveries, whether the survivors could take every critical
service if any one host died, whether HA is paused, and the last failovers."""

from __future__ import annotations

import time
from typing import Any, cast

from ha.leader import LeaderLease
from ha.plan import capacity_reserve
from ha.recovery import RecoveryStore
from ha.world import RedisWorld
from provisioner.agent.loops import late_loops, read_loops
from provisioner.runtime import Runtime
from provisioner.scheduler import SchedulerPolicy


def ha_status(rt: Runtime) -> dict[str, Any]:
    world = RedisWorld(rt)
    prefix = rt.store.keys.prefix
    r = rt.store.r
    now = world.now()
    wall = time.time()  # the agents stamp their loops with their own (NTP) clocks, as monitors do
    hosts = [
        {
            "name": h.name,
            "state": h.state.value,
            "lease": "alive" if h.lease_alive else "expired",
            "lease_age_s": round(now - h.last_seen, 2) if h.last_seen else None,
            "detection_class": f"{h.timing.dead_after_s:g} s x{h.timing.samples}",
            # A live agent whose reconcile, health or fencing loop stopped making progress (hung, stuck).
            "loops": ("; ".join(late_loops(read_loops(r, prefix, h.name), wall)) or "ok") if h.lease_alive
            else "-",
        }
        for h in world.hosts()
    ]
    leader = LeaderLease(r, prefix, "status", 1.0).current()
    monitors = []
    for member in cast(list[str], r.zrevrange(f"{prefix}:ha:monitors", 0, 49)):
        hb = cast(dict[str, str], r.hgetall(f"{prefix}:ha:monitor:{member}"))
        if hb:
            age = time.time() - float(hb.get("last_round", "0"))
            monitors.append({**hb, "age_s": round(age, 2), "leading": hb.get("leading") == "1"})
    recs = RecoveryStore(r, prefix).open_records()
    snap = rt.store.snapshot()
    reserve = capacity_reserve(snap, SchedulerPolicy.from_config(rt.config))
    failovers = [
        {"ts": e.ts, "host": e.host, "message": e.message}
        for e in rt.store.read_events(count=2000)
        if e.kind in ("recovery_closed", "host_dead")
    ][-10:]
    return {
        "paused": world.paused(),
        "leader": leader.leader if leader else None,
        "fence": leader.fence if leader else None,
        "reserve": str(reserve),
        "reserve_ok": reserve.ok,
        "hosts": hosts,
        "monitors": monitors,
        "recoveries": [
            {"host": x.host, "step": x.step.value, "fence": x.fence, "reason": x.reason} for x in recs
        ],
        "failovers": failovers,
    }
