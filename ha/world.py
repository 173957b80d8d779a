"""The engine's World on the real system: Redis state, the hosts' fence commands, the host queues."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping

from ha.detection import Timing
from ha.engine import FenceResult, HostView
from ha.health import Health, HealthStore, Mark
from ha.keeper import Declared, Hung, Limits, Start
from ha.plan import FailoverPlan
from ha.services import ServiceStore
from provisioner.errors import ConflictError, DynvmError, NotFoundError
from provisioner.messaging import BOOT, PRIORITY_HA, host_queue
from provisioner.model import HostState, Instance, InstanceState
from provisioner.runtime import Runtime, claim_request, current_catalogue
from provisioner.scheduler import Snapshot

log = logging.getLogger(__name__)
FENCE_TIMEOUT_S = 30.0


class RedisWorld:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.store = rt.store
        self.paused_key = f"{rt.store.keys.prefix}:ha:paused"
        self.services = ServiceStore(rt.store.r, rt.store.keys.prefix)
        self.marks = HealthStore(rt.store.r, rt.store.keys.prefix)
        self._unplaced: set[tuple[str, int]] = set()  # re-placements already reported as finding no room

    def now(self) -> float:
        sec, usec = self.store.r.time()
        return sec + usec / 1e6

    def _timing(self, klass: str) -> Timing:
        dc = self.rt.config.detection_classes.get(klass) or self.rt.config.detection_classes["standard"]
        return Timing(dc.lease_ttl_s, dc.dead_after_s, dc.samples)

    def hosts(self) -> list[HostView]:
        from ha.detection import heard_by_majority

        hosts = self.store.list_hosts()
        pipe = self.store.r.pipeline(transaction=False)
        for h in hosts:
            pipe.exists(self.store.keys.lease(h.name))
        alive = dict(zip((h.name for h in hosts), map(bool, pipe.execute()), strict=True))
        live = {n for n, a in alive.items() if a}
        reports = self.store.peer_reports(sorted(live)) if live else {}
        return [
            HostView(
                h.name,
                h.state,
                h.last_seen,
                alive[h.name],
                self._timing(h.detection_class),
                heard_by_majority(h.name, reports, live),
                h.watched_since,
            )
            for h in hosts
        ]

    def set_host_state(self, host: str, new: HostState, expected: HostState, reason: str, fence: int) -> bool:
        try:
            self.store.set_host_state(host, new, expected=expected, reason=reason, fence=fence)
        except (ConflictError, NotFoundError):  # InvalidTransition is a ConflictError
            return False
        return True

    def fence_host(self, host: str) -> FenceResult:
        """The configured fence command, as an argument vector (never a shell) with the host name
        appended, bounded by a timeout; its exit status decides."""
        hc = self.rt.config.host(host)
        if hc is None or not hc.fence_command:
            return FenceResult.NOT_CONFIGURED
        argv = [*hc.fence_command, host]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=FENCE_TIMEOUT_S, check=False, text=True)
        except (OSError, subprocess.TimeoutExpired) as err:
            self.event("fence_failed", host, f"{argv[0]}: {err}"[:300])
            return FenceResult.FAILED
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            self.event("fence_failed", host, f"{argv[0]} exited {done.returncode}: {tail[0][:200]}")
            return FenceResult.FAILED
        self.event("fenced", host, f"{argv[0]} succeeded")
        return FenceResult.OK

    def snapshot(self) -> Snapshot:
        return self.store.snapshot()

    def commit(self, plan: FailoverPlan, fence: int) -> dict[str, str]:
        """Claims first, all or nothing (victims' claims released in the same step); then each record moves
        by compare-and-set from what the plan read.  A record that moved meanwhile gives its claim back."""
        snap = {i.id: i for i in self.store.snapshot().instances}
        sched = self.rt.config.scheduler
        # The same claim as any placement: capacity, anti-affinity and VO quota are checked at commit.
        claims = [claim_request(self.rt, h, snap[iid]) for iid, h in plan.placements.items() if iid in snap]
        releases = [(plan.victim_hosts[v], v) for v in sorted(plan.preemptions)]
        result = self.store.claim_batch(claims, releases, sched.cpu_overcommit, sched.memory_overcommit)
        if not result.committed:
            return {}
        self._preempt(plan)
        self._workers_lost(plan)
        out: dict[str, str] = {}
        for iid in plan.order:
            host = plan.placements.get(iid)
            inst = snap.get(iid)
            if host is None or inst is None:
                continue
            try:
                rec = inst
                if rec.state is not InstanceState.LOST:
                    why = f"host {plan.dead_host} died"
                    rec = self.store.transition_from(rec, InstanceState.LOST, reason=why)
                rec = self.store.transition_from(rec, InstanceState.REQUESTED)
                self.store.transition_from(rec, InstanceState.PLACED, bump_epoch=True, host=host)
            except (ConflictError, NotFoundError) as err:
                log.warning("failover of %s: %s; giving its claim on %s back", iid, err, host)
                self.store.release_claim(host, iid)
                continue
            self.store.add_event("placed", instance=iid, host=host, message=f"failover from {plan.dead_host}")
            out[iid] = host
        return out

    def _preempt(self, plan: FailoverPlan) -> None:
        from provisioner.messaging import RELEASE

        for vid, why in sorted(plan.preemptions.items()):
            victim = self.store.get_instance(vid)
            if victim is None or victim.host != plan.victim_hosts[vid]:
                continue
            try:
                self.store.transition_from(victim, InstanceState.STOPPING, reason=why[:500])
            except (ConflictError, NotFoundError):
                continue
            self.store.add_event("preempted", instance=vid, host=plan.victim_hosts[vid], message=why)
            self.rt.app.send_task(RELEASE, args=[vid], queue=host_queue(plan.victim_hosts[vid]),
                                  priority=PRIORITY_HA)

    def _workers_lost(self, plan: FailoverPlan) -> None:
        for wid in plan.workers_lost:
            inst = self.store.get_instance(wid)
            if inst is None or inst.host != plan.dead_host or inst.state is InstanceState.LOST:
                continue
            try:
                self.store.transition_from(inst, InstanceState.LOST, reason=f"host {plan.dead_host} died")
            except (ConflictError, NotFoundError):
                continue
            self.store.add_event("worker_lost", instance=wid, host=plan.dead_host,
                                 message=f"job {inst.owner or '-'} must be requeued")

    def start(self, placements: Mapping[str, str]) -> None:
        for iid, host in placements.items():
            self.rt.app.send_task(BOOT, args=[iid], queue=host_queue(host), priority=PRIORITY_HA)

    def states(self, ids: list[str]) -> dict[str, InstanceState | None]:
        out: dict[str, InstanceState | None] = {}
        for iid in ids:
            inst = self.store.get_instance(iid)
            out[iid] = inst.state if inst is not None else None
        return out

    def event(self, kind: str, host: str | None, message: str) -> None:
        try:
            self.store.add_event(kind, message, host=host)
        except DynvmError as err:  # an event must never stop a failover
            log.warning("event %s for %s not recorded: %s", kind, host, err)

    def declared(self) -> Declared:
        services = self.services.all()
        current: dict[str, Instance | None] = {}
        restarts: dict[str, list[float]] = {}
        limits: dict[str, Limits] = {}
        cat = current_catalogue(self.rt)
        for svc in services:
            iid = self.services.current_instance(svc.name)
            current[svc.name] = self.store.get_instance(iid) if iid else None
            restarts[svc.name] = self.services.restarts(svc.name)
            try:
                ha = cat.resolve(svc.image).ha
            except DynvmError:
                ha = None
            limits[svc.name] = Limits(ha.max_restarts, ha.restart_window_s) if ha else Limits()
        return services, current, restarts, limits

    def start_service(self, start: Start, fence: int) -> bool:
        from provisioner.control.client import service_mac, submit

        if start.instance is not None:
            return self._replace(start, fence)
        svc = self.services.require(start.service)
        image = current_catalogue(self.rt).resolve(svc.image)
        inst, _ = submit(
            self.rt, image, None, service=svc.name, ip=svc.address, mac=service_mac(svc.name),
            tier=svc.priority, host=start.host,
        )
        self.services.set_current(svc.name, inst.id, restarted=start.host is not None)
        return True

    def health(self, ids: list[str]) -> dict[str, Health]:
        return self.marks.get_many(ids)

    def mark_hung(self, hung: Hung, fence: int) -> bool:
        """The keeper's decision on a hung VM, by compare-and-set (fenced) on the record and its
        ``unhealthy`` mark; a restart in place is counted against the service's limit once marked."""
        h = self.marks.get(hung.instance)
        try:
            self.marks.set(
                hung.instance, state=InstanceState.READY, host=hung.host, epoch=hung.epoch,
                expect=frozenset({Mark.UNHEALTHY}), new=hung.mark, failures=h.failures if h else 0,
                detail=hung.why, fence=fence,
            )
        except (ConflictError, NotFoundError) as err:
            log.info("hung %s: not marked %s: %s", hung.instance, hung.mark.value, err)
            return False
        if hung.mark is Mark.RESTART:
            self.services.set_current(hung.service, hung.instance, restarted=True)
        return True

    def _replace(self, start: Start, fence: int) -> bool:
        """Re-place the lost record of a hung VM its agent destroyed (same id, MAC, address, disks):
        pinned to ``start.host`` (restart in place) or through the scheduler away from ``start.avoid``
        (back there only if nowhere else fits).  Compare-and-set all the way: lost -> requested (host
        cleared), the claim, then requested -> placed on the chosen host; booted at HA priority.  A
        claim refused meanwhile hands the requested record to the control workers' normal placement."""
        from ha.plan import without_host
        from provisioner.control.sending import send_provision
        from provisioner.runtime import try_claim
        from provisioner.scheduler import PlacementRequest, SchedulerPolicy, schedule

        assert start.instance is not None
        inst = self.store.get_instance(start.instance)
        if inst is None or inst.state is not InstanceState.LOST:
            return False
        target = start.host
        if target is None:
            snap = self.store.snapshot()
            policy = SchedulerPolicy.from_config(self.rt.config)
            req = PlacementRequest.for_instance(inst)
            for view in ([without_host(snap, start.avoid)] if start.avoid else []) + [snap]:
                found = schedule([req], view, policy)
                if inst.id in found.placements and not found.preemptions:
                    target = found.placements[inst.id]
                    break
        if target is None:
            if (inst.id, inst.epoch) not in self._unplaced:
                self._unplaced.add((inst.id, inst.epoch))
                self.event("service_unplaced", inst.host,
                           f"{start.service}: no host takes {inst.id} now; tried again every round")
            return False
        try:
            rec = self.store.transition_from(inst, InstanceState.REQUESTED, host=None)
        except (ConflictError, NotFoundError) as err:
            log.info("re-placing %s: %s", inst.id, err)
            return False
        code = try_claim(self.rt, target, rec)
        if code != "ok":
            self.event("service_replace", target, f"{start.service}: claim on {target} refused ({code}); "
                       "the control workers place it")
            send_provision(self.rt, rec.id)
            self.services.set_current(start.service, rec.id, restarted=False)
            return True
        try:
            self.store.transition_from(rec, InstanceState.PLACED, bump_epoch=True, host=target)
        except (ConflictError, NotFoundError) as err:
            log.warning("re-placing %s: %s; giving its claim on %s back", rec.id, err, target)
            self.store.release_claim(target, rec.id)
            return False
        self.store.add_event("placed", instance=rec.id, host=target, message=start.why)
        self.start({rec.id: target})
        self.services.set_current(start.service, rec.id, restarted=False)
        return True

    def paused(self) -> str | None:
        value = self.store.r.get(self.paused_key)
        return str(value) if value is not None else None

    def pause(self, reason: str) -> None:
        self.store.r.set(self.paused_key, reason[:500])

    def resume(self) -> bool:
        return bool(self.store.r.delete(self.paused_key))
