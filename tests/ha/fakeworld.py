"""A hand-written stateful World for the engine's scenario tests (pure logic; the real one is on Redis).

It keeps hosts, leases and instance records, applies the engine's writes with the same compare-and-set
rules the real store has, boots started VMs one round later, and writes a readable log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ha.detection import Timing
from ha.engine import FenceResult, HostView
from ha.keeper import Declared, Start
from ha.plan import FailoverPlan
from provisioner.model import Host, HostState, Instance, InstanceState
from provisioner.scheduler import Snapshot


class FakeWorld:
    def __init__(self, hosts: list[Host], instances: list[Instance], timing: Timing) -> None:
        self.t0 = self.clock = 1000.0
        self.timing = timing
        self.hostrec = {h.name: h for h in hosts}
        self.last_seen = {h.name: self.clock for h in hosts}
        self.inst = {i.id: i for i in instances}
        self.log: list[str] = []
        self.fence_results: dict[str, FenceResult] = {}
        self.boot_fails: set[str] = set()
        self._paused: str | None = None
        self._booting: set[str] = set()
        self.starts: list[tuple[str, str]] = []
        self.crash_on_start = False  # the leader dies right after committing a plan
        self.heard: set[str] = set()  # hosts most live peers still hear over UDP (cut off from Redis only)

    # -- test controls --------------------------------------------------------------------------------
    def advance(self, dt: float, renewing: set[str]) -> None:
        self.clock += dt
        for h in renewing:
            self.last_seen[h] = self.clock
        for iid in sorted(self._booting):  # VMs started in the previous round finish booting
            self.inst[iid].state = InstanceState.FAILED if iid in self.boot_fails else InstanceState.READY
            self._booting.discard(iid)

    def _log(self, text: str) -> None:
        self.log.append(f"{self.clock - self.t0:5.1f} {text}")

    # -- World ----------------------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock

    def hosts(self) -> list[HostView]:
        return [
            HostView(n, h.state, self.last_seen[n], self.clock - self.last_seen[n] <= self.timing.lease_ttl_s,
                     self.timing, n in self.heard)
            for n, h in sorted(self.hostrec.items())
        ]

    def set_host_state(self, host: str, new: HostState, expected: HostState, reason: str, fence: int) -> bool:
        h = self.hostrec[host]
        if h.state is not expected:
            return False
        h.state = new
        self._log(f"host {host} {expected.value} -> {new.value}")
        return True

    def fence_host(self, host: str) -> FenceResult:
        result = self.fence_results.get(host, FenceResult.NOT_CONFIGURED)
        if result is not FenceResult.NOT_CONFIGURED:
            self._log(f"fence command for {host}: {result.value}")
        return result

    def snapshot(self) -> Snapshot:
        hosts = [dataclasses.replace(h, used_vcpus=0, used_memory_mib=0) for h in self.hostrec.values()]
        by = {h.name: h for h in hosts}
        live = [i for i in self.inst.values() if i.state not in (InstanceState.GONE, InstanceState.FAILED)]
        for i in live:
            if i.host in by:
                by[i.host].used_vcpus += i.vcpus
                by[i.host].used_memory_mib += i.memory_mib
        return Snapshot(tuple(hosts), tuple(dataclasses.replace(i) for i in live), self.clock)

    def commit(self, plan: FailoverPlan, fence: int) -> dict[str, str]:
        for vid in sorted(plan.preemptions):
            self.inst[vid].state = InstanceState.GONE
            self._log(f"preempt {vid} on {plan.victim_hosts[vid]}")
        for wid in plan.workers_lost:
            if self.inst[wid].state is not InstanceState.LOST:
                self.inst[wid].state = InstanceState.LOST
                self._log(f"worker {wid} lost: requeue its job")
        out = {}
        for iid in plan.order:
            if iid in plan.placements:
                i = self.inst[iid]
                i.host, i.state = plan.placements[iid], InstanceState.PLACED
                out[iid] = i.host
        return out

    def start(self, placements: Mapping[str, str]) -> None:
        if self.crash_on_start:
            raise RuntimeError("leader crashed before sending the boots")
        for iid, host in placements.items():
            if self.inst[iid].state is InstanceState.PLACED:
                self.inst[iid].state = InstanceState.BOOTING
                self._booting.add(iid)
                self.starts.append((iid, host))
                self._log(f"start {iid} on {host}")

    def states(self, ids: list[str]) -> dict[str, InstanceState | None]:
        return {i: (self.inst[i].state if i in self.inst else None) for i in ids}

    def event(self, kind: str, host: str | None, message: str) -> None:
        self._log(f"event {kind} {host or '-'}: {message}")

    def paused(self) -> str | None:
        return self._paused

    def pause(self, reason: str) -> None:
        self._paused = reason

    def declared(self) -> Declared:
        return [], {}, {}, {}

    def start_service(self, start: Start, fence: int) -> None:  # pragma: no cover - nothing declared here
        raise AssertionError("the fake world declares no services")
