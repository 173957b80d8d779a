"""The control workers' sweeper: the instance records are an outbox, and nothing stays requested or placed
because a message was lost.

A request is recorded before its PROVISION message is sent, and a placement before its BOOT message: a
Redis or broker outage between the two (or a message lost with a crashed Redis) strands the record.  Every
control worker runs a sweeper thread that reads the requested and placed records (O(live)), decides per
record with the pure ``decide`` below, and acts by compare-and-set on the record it decided on:

    requested, never picked up, no control worker was alive for pickup_deadline_s  -> fail (that reason)
    requested for longer than timeouts.provision_s                                   -> fail
    requested, no control worker started on it for resend_after_s                    -> send PROVISION again
    placed, its host's agent holds no lease for replace_after_s                      -> back to requested
                                                                                        (claim released,
                                                                                        new epoch) and
                                                                                        PROVISION again;
                                                                                        fail after
                                                                                        max_placements
    placed, agent alive, not booting after timeouts.provision_s                      -> fail
    placed, agent alive, not booting after boot_after_s                              -> send BOOT again

Sending twice is safe: placement is a compare-and-set requested -> placed and a boot is idempotent; the
re-send slots (state.outbox) rate-limit duplicates with a doubling back-off.  Several workers may sweep at
once: every write is a compare-and-set, so one wins.  The sweeper also does the retention housekeeping
(state.retention): retire just-ended records, revive retired ones that came back, expire old ones.

The loop survives any exception; each run is recorded in the ``sweeper`` hash (worker, time, counts,
errors, last error), so a stalled sweeper shows as an old ``last_run``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from enum import StrEnum

from provisioner.config import OutboxConfig
from provisioner.errors import ConflictError, DynvmError, NotFoundError
from provisioner.model import Host, Instance, InstanceState, Tier
from provisioner.runtime import Runtime

log = logging.getLogger(__name__)
S = InstanceState


class Verdict(StrEnum):
    KEEP = "keep"
    RESEND = "resend"  # send PROVISION again
    REBOOT = "reboot"  # send BOOT to the host's agent again
    REPLACE = "replace"  # back to requested (claim released), then PROVISION again
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Observed:
    """One requested or placed record, with what the sweeper read around it."""

    inst: Instance
    picked_at: float | None = None  # when a control worker last started on it (Redis clock)
    host: Host | None = None  # a placed record's host as read (None: unknown / removed)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""


def decide(
    obs: Observed, now: float, workers_since: float, cfg: OutboxConfig, provision_s: float
) -> Decision:
    """What to do with one record (pure).  ``workers_since``: since when some control worker has been
    alive without a gap; ``now`` and every time compared are wall-clock seconds (Redis clock)."""
    inst = obs.inst
    since = inst.updated or inst.created  # when it entered its state (a re-placement restarts it)
    if inst.state is S.REQUESTED:
        if obs.picked_at is None and since + cfg.pickup_deadline_s < workers_since:
            return Decision(
                Verdict.FAIL, f"no control worker picked it up within {cfg.pickup_deadline_s:.0f} s"
            )
        if now - since > provision_s:
            return Decision(Verdict.FAIL, f"not placed within {provision_s:.0f} s")
        if now - max(since, obs.picked_at or 0.0) > cfg.resend_after_s:
            return Decision(Verdict.RESEND, "no control worker is on it")
        return Decision(Verdict.KEEP)
    if inst.state is not S.PLACED or inst.host is None:
        return Decision(Verdict.KEEP)
    host = obs.host
    if host is None or not host.lease_alive:
        last_sign = max(since, host.last_seen if host is not None else 0.0)
        if now - last_sign <= cfg.replace_after_s:
            return Decision(Verdict.KEEP)
        if inst.attempts + 1 >= cfg.max_placements:
            return Decision(
                Verdict.FAIL, f"host {inst.host}'s agent never started it ({inst.attempts + 1} placements)"
            )
        return Decision(Verdict.REPLACE, f"host {inst.host}'s agent holds no lease")
    if now - since > provision_s:
        return Decision(Verdict.FAIL, f"host {inst.host}'s agent did not start it within {provision_s:.0f} s")
    if now - since > cfg.boot_after_s:
        return Decision(Verdict.REBOOT, f"host {inst.host}'s agent has not started it")
    return Decision(Verdict.KEEP)


def liveness_s(cfg: OutboxConfig) -> float:
    """How long a control worker counts as alive after its last sweep."""
    return max(3 * cfg.sweep_interval_s, 10.0)


class Sweeper:
    """One per control worker process; ``start()`` runs it in a daemon thread."""

    def __init__(self, rt: Runtime, name: str) -> None:
        self.rt = rt
        self.name = name
        self.runs = 0
        self.errors = 0
        self.last_error = ""
        self.last_run = 0.0
        self.stop = threading.Event()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="dynvm-sweeper", daemon=True)
        t.start()
        return t

    def run(self) -> None:
        interval = self.rt.config.outbox.sweep_interval_s
        while not self.stop.is_set():
            try:
                self.sweep_once()
            except Exception as err:  # the loop survives anything; the error is recorded
                self.errors += 1
                self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[
                    :300
                ]
                log.warning("sweeper %s: %s", self.name, self.last_error)
                self._record({})
            self.stop.wait(interval)

    def sweep_once(self) -> dict[str, int]:
        """One pass: decide and act on every requested/placed record, then the retention steps."""
        rt, cfg = self.rt, self.rt.config.outbox
        now, workers_since = rt.store.worker_heartbeat(self.name, liveness_s(cfg))
        records = rt.store.list_instances(state=S.REQUESTED) + rt.store.list_instances(state=S.PLACED)
        hosts = {h.name: h for h in rt.store.snapshot(instances=False).hosts}
        picked = rt.store.picked_at([i.id for i in records if i.state is S.REQUESTED])
        counts = {v.value: 0 for v in Verdict if v is not Verdict.KEEP}
        for inst in records:
            obs = Observed(inst, picked.get(inst.id), hosts.get(inst.host) if inst.host else None)
            d = decide(obs, now, workers_since, cfg, rt.config.timeouts.provision_s)
            if d.verdict is not Verdict.KEEP and self._apply(inst, d):
                counts[d.verdict.value] += 1
        counts.update(self._housekeeping())
        self.runs += 1
        self.last_run = now
        self._record(counts)
        return counts

    def _apply(self, inst: Instance, d: Decision) -> bool:
        """Act on the record ``d`` was decided on; False if it changed meanwhile or the send failed."""
        from provisioner.control.sending import send_boot, send_provision

        rt, cfg = self.rt, self.rt.config.outbox
        try:
            if d.verdict is Verdict.RESEND:
                if not rt.store.take_resend_slot(inst.id, cfg.resend_after_s):
                    return False
                send_provision(rt, inst.id)
            elif d.verdict is Verdict.REBOOT:
                if inst.host is None or not rt.store.take_resend_slot(inst.id, cfg.boot_after_s):
                    return False
                send_boot(rt, inst.id, inst.host, inst.tier in (Tier.CRITICAL, Tier.HIGH))
            elif d.verdict is Verdict.REPLACE:
                rt.store.transition_from(
                    inst, S.REQUESTED, host=None, attempts=inst.attempts + 1, reason=d.reason[:500]
                )
                send_provision(rt, inst.id)
            elif d.verdict is Verdict.FAIL:
                rt.store.transition_from(inst, S.FAILED, reason=d.reason[:500])
                rt.store.notify(inst.id)
            else:
                return False
        except (ConflictError, NotFoundError):
            return False  # it moved on since our read: the next pass decides on what it finds then
        except DynvmError as err:
            log.warning("sweeper %s: %s of %s: %s", self.name, d.verdict.value, inst.id, err)
            return False
        rt.store.add_event(f"sweep_{d.verdict.value}", d.reason, instance=inst.id, host=inst.host or "")
        log.info("sweeper %s: %s %s (%s)", self.name, d.verdict.value, inst.id, d.reason)
        return True

    def _housekeeping(self) -> dict[str, int]:
        store, ret = self.rt.store, self.rt.config.retention
        back = [i.id for st in (S.REQUESTED, S.STOPPING) for i in store.list_instances(state=st)]
        revived = store.revive(store.retired_among(back)) if back else 0
        return {
            "revived": revived,
            "retired": store.retire_ended(ret.history_max),
            "expired": store.purge_ended(ret.ended_s),
        }

    def _record(self, counts: dict[str, int]) -> None:
        fields = {
            "worker": self.name,
            "last_run": self.last_run,
            "runs": self.runs,
            "errors": self.errors,
            "last_error": self.last_error,
            **counts,
        }
        with contextlib.suppress(Exception):  # Redis down: the next run records again
            self.rt.store.record_sweep(fields)


def start_sweeper(rt: Runtime, name: str) -> Sweeper:
    sw = Sweeper(rt, name)
    sw.start()
    return sw
