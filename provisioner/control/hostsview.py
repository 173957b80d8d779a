"""A control worker's short-lived view of the hosts, for placements that need only the hosts.

Reading every host (a hash each, plus their leases) for every placement costs a round trip and O(hosts)
parsing per request; at site scale that is most of a placement.  The view is reused for up to ``ttl_s``
and counts this worker's own claims, so its consecutive placements spread as they would on a fresh read.
It may miss other workers' claims and a host's change of state for up to ``ttl_s``: harmless, because the
atomic claim (claim.lua) re-checks capacity, host state and lease, and a refused claim (or a request the
view cannot place) drops the view, so the retry reads afresh.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from provisioner.scheduler.types import Snapshot
from provisioner.state.store import StateStore

TTL_S = 0.25


class HostsView:
    def __init__(self, ttl_s: float = TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._at = 0.0

    def snapshot(self, store: StateStore) -> tuple[Snapshot, bool]:
        """The hosts (no instances) and whether that was a fresh read."""
        now = time.monotonic()
        with self._lock:
            if self._snap is not None and now - self._at < self.ttl_s:
                return self._snap, False
        snap = store.snapshot(instances=False)
        with self._lock:
            self._snap, self._at = snap, now
        return snap, True

    def claimed(self, host: str, vcpus: int, memory_mib: int) -> None:
        """Count a claim this worker just committed on ``host``."""
        with self._lock:
            if self._snap is None:
                return
            hosts = tuple(
                dataclasses.replace(
                    h, used_vcpus=h.used_vcpus + vcpus, used_memory_mib=h.used_memory_mib + memory_mib
                )
                if h.name == host
                else h
                for h in self._snap.hosts
            )
            self._snap = Snapshot(hosts=hosts, instances=(), taken_at=self._snap.taken_at)

    def drop(self) -> None:
        with self._lock:
            self._snap = None
