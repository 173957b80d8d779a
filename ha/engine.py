"""The leader monitor's failover engine: one round = detect, open recoveries, drive each open recovery one
step.  Decisions come from the pure modules (detection, plan, fencing); every effect goes through the
``World`` seam (Redis state, the fence command, the host queues), and every step is persisted in the
recovery record first, so a leader that dies mid-failover is resumed by the next one at the right step.

Exactly-once in effect: a record's step changes by compare-and-set on (step, fencing token); the world's
writes are compare-and-set too (host state, instance state/host/epoch), so a duplicate or stale action
fails instead of starting a VM twice.  Nothing is started elsewhere before the host is fenced.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from ha.detection import Observation, Timing, Verdict, heard_at, judge
from ha.fencing import restart_allowed_after
from ha.health import Health
from ha.keeper import Declared, Hung, Start, decide, decide_hung
from ha.plan import FailoverPlan, plan_failover, services_on
from ha.recovery import Recovery, RecoveryStore, Step
from provisioner.model import HostState, InstanceState
from provisioner.scheduler import SchedulerPolicy, Snapshot

log = logging.getLogger(__name__)


class FenceResult(StrEnum):
    NOT_CONFIGURED = "not_configured"
    OK = "ok"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class HostView:
    name: str
    state: HostState
    last_seen: float  # Redis time of its last lease renewal (in a round: or of its return, heard_at)
    lease_alive: bool
    timing: Timing
    heard_by_peers: bool = False  # see ha.detection.Observation
    watched_since: float = 0.0  # Redis time of its last return to watch (provisioner.model.Host)


@dataclass(frozen=True, slots=True)
class Settings:
    storm_share: float = 0.5  # more than this share of hosts dead at once: hold for an operator
    safety_margin_s: float = 0.5  # added to the self-fence/watchdog deadline before restarting elsewhere
    watchdog_s: float = 2.0  # the agents' watchdog timeout


class World(Protocol):
    """Everything the engine reads and writes, in one seam (Redis + fence agents + host queues)."""

    def now(self) -> float:
        """Redis's clock."""

    def hosts(self) -> list[HostView]: ...

    def set_host_state(self, host: str, new: HostState, expected: HostState, reason: str, fence: int) -> bool:
        """Compare-and-set, refused (False) if the host moved on or the fence no longer leads."""

    def fence_host(self, host: str) -> FenceResult:
        """Run the host's external fence command, if one is configured (argument vector, timeout)."""

    def snapshot(self) -> Snapshot: ...

    def commit(self, plan: FailoverPlan, fence: int) -> dict[str, str]:
        """Claim capacity and move each service record to its new host atomically (preempting victims,
        marking the dead host's workers lost); returns the placements that were committed."""

    def start(self, placements: Mapping[str, str]) -> None:
        """Send the boots to the survivors' queues ahead of any provisioning backlog (idempotent)."""

    def states(self, ids: list[str]) -> dict[str, InstanceState | None]: ...

    def event(self, kind: str, host: str | None, message: str) -> None: ...

    def paused(self) -> str | None:
        """Why automatic failover is paused (``dynvm ha pause`` or a fencing storm), or None."""

    def pause(self, reason: str) -> None: ...

    def declared(self) -> Declared:
        """Declared services, each one's current instance record, restart times and restart limits."""

    def start_service(self, start: Start, fence: int) -> bool:
        """Start a declared service (pinned to ``start.host`` or anywhere) and remember it as its VM;
        False if nothing could be started this round (a re-placement that found no room: next round)."""

    def health(self, ids: list[str]) -> dict[str, Health]:
        """The health marks of these instance records (ha/health.py)."""

    def mark_hung(self, hung: Hung, fence: int) -> bool:
        """Mark a hung VM for its agent to stop (restart in place counted); False if it moved on."""


@dataclass
class RoundReport:
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    opened: list[str] = field(default_factory=list)
    advanced: list[tuple[str, Step]] = field(default_factory=list)
    started_services: list[str] = field(default_factory=list)


class Engine:
    def __init__(
        self, world: World, recoveries: RecoveryStore, policy: SchedulerPolicy, settings: Settings
    ) -> None:
        self.world = world
        self.recs = recoveries
        self.policy = policy
        self.settings = settings
        self.counts: dict[str, int] = {}
        self._reported: set[str] = set()
        self._storm_held: set[str] = set()  # hosts held by the storm that paused HA (resume confirms them)
        self._settled: set[str] = set()  # dead/fenced hosts found without service VMs to recover

    def round(self, fence: int) -> RoundReport:
        """One monitor round as the leader holding ``fence``."""
        report = RoundReport()
        views = {h.name: h for h in self.world.hosts()}
        now = self.world.now()
        # A host rejoined before its new agent's first renewal is judged (and fenced) from its return, not
        # from the renewal it made before its death.
        for name, v in views.items():
            heard = heard_at(v.state, v.last_seen, v.watched_since)
            if heard != v.last_seen:
                views[name] = dataclasses.replace(v, last_seen=heard)
        open_hosts = {r.host for r in self.recs.open_records()}
        obs = [
            Observation(h.name, h.state, now - h.last_seen, h.lease_alive, h.timing, h.heard_by_peers)
            for h in views.values()
        ]
        out = judge(obs, self.counts, self.settings.storm_share, already_dead=len(open_hosts))
        self.counts = out.counts
        report.verdicts = out.verdicts
        paused = self.world.paused()
        if not out.storm:
            self._storm_held = set()
        elif paused is not None:
            self._storm_held |= set(out.held)  # what the operator's `ha resume` will confirm
        elif set(out.held) <= self._storm_held:
            # The operator resumed after this very storm paused HA: that confirms these deaths (without
            # this, every round after `ha resume` found the same storm and paused again, for ever).
            for h in out.held:
                out.verdicts[h] = Verdict.DEAD
        else:
            self._storm_held |= set(out.held)
            why = f"fencing storm: {', '.join(out.held)} silent at once; confirm with 'dynvm ha resume'"
            self.world.pause(why)
            self.world.event("ha_paused", None, why)
        if self.world.paused() is not None:
            return report
        for name in out.dead:
            if self._declare_dead(views[name], now, fence, report):
                views[name] = dataclasses.replace(views[name], state=HostState.DEAD)
        self._adopt(views, fence, report)
        for rec in self.recs.open_records():
            self._drive(rec, views.get(rec.host), now, fence, report)
        self._keep(views, now, fence, report)
        return report

    def _keep(self, views: Mapping[str, HostView], now: float, fence: int, report: RoundReport) -> None:
        """Declared services are never silently absent (keeper.decide)."""
        declared, current, restarts, limits = self.world.declared()
        if not declared:
            return
        recovering = frozenset(r.host for r in self.recs.open_records())
        states = {name: v.state for name, v in views.items()}
        insts = [i for i in current.values() if i is not None]
        health = self.world.health([i.id for i in insts])
        starts, problems = decide(declared, insts, states, restarts, limits, now, recovering, health)
        for text in problems:
            if text not in self._reported:
                self._reported.add(text)
                self.world.event("service_duplicate", None, text)
        for st in starts:
            if self.world.start_service(st, fence) is False:
                continue  # no room for the re-placement this round: tried again next round
            report.started_services.append(st.service)
            self.world.event("service_start", st.host, f"{st.service}: {st.why}")
        for hung in decide_hung(declared, insts, states, restarts, limits, now, health):
            if self.world.mark_hung(hung, fence):
                self.world.event("service_hung", hung.host, f"{hung.service}: {hung.why}")

    def _adopt(self, views: Mapping[str, HostView], fence: int, report: RoundReport) -> None:
        """A dead or fenced host that no record recovers (an operator's ``dynvm host fence``, or a leader
        that died between declaring a host dead and opening its record) still has its service VMs brought
        back: a record is opened for it.  Checked once per stay of a host in that state (one snapshot)."""
        self._settled &= {n for n, v in views.items() if v.state in (HostState.DEAD, HostState.FENCED)}
        open_hosts = {r.host for r in self.recs.open_records()}
        todo = [v for n, v in sorted(views.items()) if v.state in (HostState.DEAD, HostState.FENCED)
                and n not in open_hosts and n not in self._settled]
        if not todo:
            return
        snap = self.world.snapshot()
        for h in todo:
            if not services_on(snap, h.name):
                self._settled.add(h.name)
                continue
            why = f"host {h.state.value} with service VMs and no recovery (operator fence or interrupted)"
            if self.recs.open(h.name, fence, why):
                report.opened.append(h.name)
                self.world.event("recovery_adopted", h.name, why)

    def _declare_dead(self, h: HostView, now: float, fence: int, report: RoundReport) -> bool:
        silence = now - h.last_seen
        why = f"lease silent {silence:.2f} s (class allows {h.timing.dead_after_s:g} s)"
        if not self.world.set_host_state(h.name, HostState.DEAD, h.state, why, fence):
            return False  # the host moved on (renewed, operator action) or we were deposed
        if self.recs.open(h.name, fence, why):
            report.opened.append(h.name)
            self.world.event("host_dead", h.name, why)
        return True

    def _advance(
        self, rec: Recovery, new: Step, fence: int, report: RoundReport, detail: dict[str, Any] | None = None
    ) -> None:
        self.recs.advance(rec.host, fence, rec.step, new, detail)
        report.advanced.append((rec.host, new))
        self.world.event(f"recovery_{new.value}", rec.host, _describe(new, detail))
        rec.step = new
        if detail is not None:
            rec.detail = detail

    def _drive(self, rec: Recovery, h: HostView | None, now: float, fence: int, report: RoundReport) -> None:
        """Move one record on as far as this round allows; each step is persisted before the next."""
        if h is not None and h.state not in (HostState.DEAD, HostState.FENCED):
            # An operator brought the host back (rejoin): nothing left to recover.
            self._advance(rec, Step.CLOSED, fence, report, {**rec.detail, "cancelled": f"host is {h.state}"})
            return
        if rec.step is Step.OPEN:
            if h is not None and not self._fenced(h, now):
                return
            self.world.set_host_state(rec.host, HostState.FENCED, HostState.DEAD, "fenced", fence)
            self._advance(rec, Step.FENCED, fence, report, {"started": {}, "pending": {}, "unplaced": {}})
        if rec.step is Step.FENCED:
            self._plan(rec, fence, report)
        if rec.step is Step.PLANNED:
            if rec.detail.get("pending"):
                self.world.start(rec.detail["pending"])
                started = {**rec.detail.get("started", {}), **rec.detail["pending"]}
                detail = {**rec.detail, "started": started, "pending": {}}
                self._advance(rec, Step.STARTED, fence, report, detail)
            elif rec.detail.get("unplaced"):
                self._plan(rec, fence, report)  # capacity may have come back: try again each round
                return
            else:
                self._close(rec, fence, report)
                return
        if rec.step is Step.STARTED:
            self._confirm(rec, fence, report)

    def _plan(self, rec: Recovery, fence: int, report: RoundReport) -> None:
        plan = plan_failover(self.world.snapshot(), rec.host, self.policy)
        committed = self.world.commit(plan, fence) if plan.placements or plan.workers_lost else {}
        unplaced = {k: str(v) for k, v in plan.unplaced.items()}
        unplaced.update({k: "capacity taken meanwhile" for k in plan.placements if k not in committed})
        detail = {
            **rec.detail,
            "pending": committed,
            "unplaced": unplaced,
            "workers_lost": sorted({*rec.detail.get("workers_lost", []), *plan.workers_lost}),
            "preempted": sorted({*rec.detail.get("preempted", []), *plan.preemptions}),
        }
        if rec.step is Step.PLANNED and detail == rec.detail:
            return  # nothing changed: no write, no event (a re-plan runs every round)
        self._advance(rec, Step.PLANNED, fence, report, detail)

    def _fenced(self, h: HostView, now: float) -> bool:
        """The old copies are provably gone: the self-fence / watchdog deadline has passed, and the
        external fence command (when configured) succeeded."""
        if h.lease_alive:
            # Its agent still renews (an operator fenced a live host, or a host declared dead came back):
            # only its own agent's word proves the old copies gone.  On seeing its host dead or fenced it
            # destroys its HA guests and marks their records lost (provisioner.agent.fencing); until every
            # service record there says so, nothing starts elsewhere.
            snap = self.world.snapshot()
            left = [i.id for i in services_on(snap, h.name) if i.state is not InstanceState.LOST]
            return not left and self.world.fence_host(h.name) is not FenceResult.FAILED
        deadline = restart_allowed_after(
            h.last_seen, h.timing.lease_ttl_s, self.settings.watchdog_s, self.settings.safety_margin_s
        )
        if now < deadline or h.heard_by_peers:
            # Heard again by its peers: its agent is alive and only cut off from Redis, so it paused and
            # keeps its VMs; restarting them elsewhere would run them twice.
            return False
        return self.world.fence_host(h.name) is not FenceResult.FAILED

    def _confirm(self, rec: Recovery, fence: int, report: RoundReport) -> None:
        started: dict[str, str] = rec.detail.get("started", {})
        states = self.world.states(sorted(started))
        if any(s not in SETTLED for s in states.values()):
            return  # still booting
        if rec.detail.get("unplaced"):
            self._plan(rec, fence, report)
            return
        self._close(rec, fence, report, states)

    def _close(
        self,
        rec: Recovery,
        fence: int,
        report: RoundReport,
        states: Mapping[str, InstanceState | None] | None = None,
    ) -> None:
        states = states or {}
        detail = {
            **rec.detail,
            "ready": sorted(k for k, s in states.items() if s is InstanceState.READY),
            "failed": sorted(k for k, s in states.items() if s is not InstanceState.READY),
        }
        if rec.step is Step.STARTED:  # a host without service VMs has nothing started to confirm
            self._advance(rec, Step.CONFIRMED, fence, report, detail)
        self._advance(rec, Step.CLOSED, fence, report, detail)


SETTLED = frozenset({InstanceState.READY, InstanceState.FAILED, InstanceState.LOST, InstanceState.GONE, None})


def _describe(step: Step, detail: Mapping[str, object] | None) -> str:
    if not detail:
        return step.value
    parts = [step.value]
    placements = detail.get("pending")
    if isinstance(placements, Mapping) and placements:
        parts.append("placements " + ", ".join(f"{k}->{v}" for k, v in placements.items()))
    unplaced = detail.get("unplaced")
    if isinstance(unplaced, Mapping) and unplaced:
        parts.append(f"unplaced {', '.join(unplaced)}")
    return "; ".join(parts)
