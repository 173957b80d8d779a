"""``dynvm monitor``: several may run; one leads (Redis lease with a fencing token) and runs the failover
engine every round; the others stand by and take over within one lease period, resuming open recoveries.

The loop survives any exception (counted, logged, the next round goes on) and is observable: each monitor
writes a heartbeat hash (``PREFIX:ha:monitor:MEMBER``: last round, rounds, errors, last error, leading,
fence) that ``dynvm ha status`` shows, so a stalled monitor is visible.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

from ha.engine import Engine, Settings
from ha.leader import LeaderLease
from ha.recovery import FencedOut, RecoveryStore
from ha.world import RedisWorld
from provisioner.runtime import Runtime
from provisioner.scheduler import SchedulerPolicy

log = logging.getLogger(__name__)
HEARTBEAT_TTL_S = 60


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    round_s: float = 0.1  # how often the leader looks (detection resolution)
    lease_ttl_s: float = 1.0  # leader lease: a standby takes over within this
    engine: Settings = field(default_factory=Settings)


class Monitor:
    def __init__(self, rt: Runtime, settings: MonitorSettings, member: str | None = None) -> None:
        self.rt = rt
        self.settings = settings
        self.member = member or f"mon-{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(2)}"
        prefix = rt.store.keys.prefix
        self.lease = LeaderLease(rt.store.r, prefix, self.member, settings.lease_ttl_s)
        self.recs = RecoveryStore(rt.store.r, prefix)
        self.world = RedisWorld(rt)
        self.engine = Engine(self.world, self.recs, SchedulerPolicy.from_config(rt.config), settings.engine)
        self.hb_key = f"{prefix}:ha:monitor:{self.member}"
        self.members_key = f"{prefix}:ha:monitors"
        self.rounds = 0
        self.errors = 0
        self.last_error = ""
        self.fence = 0

    def step(self) -> None:
        """One round: renew or take leadership; lead a round if we hold it."""
        lead = self.lease.acquire_or_renew()
        if lead.leading and lead.fence != self.fence:
            log.warning("monitor %s leads (fence %d)", self.member, lead.fence)
            self.world.event("monitor_leader", None, f"{self.member} leads with fence {lead.fence}")
            self.engine.counts = {}  # a new leader debounces from scratch (returns to watch are in Redis)
        self.fence = lead.fence
        if lead.leading:
            self.engine.round(lead.fence)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.step()
            except FencedOut as err:
                log.warning("monitor %s deposed: %s", self.member, err)
                self.fence = 0
            except Exception as err:  # the loop must outlive any error; it is counted and shown
                self.errors += 1
                self.last_error = f"{type(err).__name__}: {err}"[:300]
                log.exception("monitor %s: round failed", self.member)
            self.rounds += 1
            self._heartbeat()
            stop.wait(max(0.0, self.settings.round_s - (time.monotonic() - started)))
        if self.fence:
            try:
                self.lease.resign(self.fence)
            except Exception as err:  # shutting down: the lease expires anyway
                log.warning("monitor %s: resign failed: %s", self.member, err)

    def _heartbeat(self) -> None:
        try:
            pipe = self.rt.store.r.pipeline(transaction=False)
            pipe.hset(
                self.hb_key,
                mapping={
                    "member": self.member,
                    "last_round": f"{time.time():.3f}",
                    "rounds": self.rounds,
                    "errors": self.errors,
                    "last_error": self.last_error,
                    "leading": int(self.fence > 0),
                    "fence": self.fence,
                },
            )
            pipe.expire(self.hb_key, HEARTBEAT_TTL_S)
            pipe.zadd(self.members_key, {self.member: time.time()})
            # Members silent for a day are forgotten (the index stays O(monitors)).
            pipe.zremrangebyscore(self.members_key, 0, time.time() - 86400)
            pipe.execute()
        except Exception as err:  # Redis down: the round counter above still moves; say so in the log
            self.errors += 1
            self.last_error = f"heartbeat: {type(err).__name__}: {err}"[:300]
