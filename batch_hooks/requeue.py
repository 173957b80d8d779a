"""A worker VM lost under a running job (host death, preemption, crash): dynvm requeues the job itself.

The sweep walks the jobs that have a VM recorded (``<prefix>:jobvms``); a job whose VM is ``lost`` or
``failed`` is requeued through its batch system once (``HSETNX requeued`` on the job's record decides who
does it when several workers sweep), and an event ``job_requeued`` records it.  The requeued attempt's
prolog gets a fresh VM (new attempt, new idempotency key).  A VM that went away because the epilog released
it is ``stopping``/``gone``, never lost, so a job that ended normally is never requeued.

Every control worker of a farm with Slurm runs the loop (``run_forever``); each pass is recorded in the hash
``<prefix>:requeue`` (last run and last error, by which worker, counts), which ``dynvm status`` shows, STALLED
when no worker has swept for a few intervals.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from batch_hooks.proto import jobvm_key, jobvms_key
from provisioner.errors import UnavailableError, ValidationError
from provisioner.model import InstanceState
from provisioner.runtime import Runtime
from provisioner.state.base import as_str_dict

log = logging.getLogger("dynvm.hooks.requeue")
LOST_STATES = frozenset({InstanceState.LOST, InstanceState.FAILED})


@dataclass(frozen=True, slots=True)
class JobVM:
    job_key: str
    instance: str
    state: InstanceState | None  # None: the instance record is gone
    batch: str
    cluster: str
    job_id: str
    requeued: bool


def to_requeue(jobs: list[JobVM]) -> list[JobVM]:
    """Decide (pure): the jobs whose VM is lost or failed and that were not requeued yet."""
    return [j for j in jobs if j.state in LOST_STATES and not j.requeued]


def to_forget(jobs: list[JobVM]) -> list[JobVM]:
    """Decide (pure): records whose VM is gone (or whose instance record is): the epilog never came (a
    controller restart, an operator's release).  Their per-job Redis user and record go, as the epilog's
    would; a job still running on such a VM has lost it anyway."""
    return [j for j in jobs if j.state is None or j.state is InstanceState.GONE]


class Requeuer(Protocol):
    def requeue(self, cluster: str, job_id: str) -> None:
        """Ask the batch system to requeue the job; raise a DynvmError if it refuses."""
        ...


class SlurmRequeue:
    """``scontrol requeue JOB`` (works for running and just-finished batch jobs)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(env) if env is not None else None

    def requeue(self, cluster: str, job_id: str) -> None:
        if not re.fullmatch(r"[0-9]{1,12}(_[0-9]{1,9})?", job_id):
            raise ValidationError(f"slurm job id {job_id[:32]!r} is malformed")
        res = subprocess.run(["scontrol", "requeue", job_id], env=self.env, capture_output=True, text=True,
                             timeout=30, check=False)
        if res.returncode != 0:
            raise UnavailableError(f"scontrol requeue {job_id}: {res.stderr.strip()[:160]}")


def _read(rt: Runtime) -> list[JobVM]:
    prefix = rt.store.keys.prefix
    out = []
    for key in sorted(rt.store.r.smembers(jobvms_key(prefix))):
        rec = as_str_dict(rt.store.r.hgetall(jobvm_key(prefix, str(key))))  # decode_responses=True
        if not rec.get("instance"):
            continue
        inst = rt.store.get_instance(rec["instance"])
        out.append(JobVM(str(key), rec["instance"], inst.state if inst else None, rec.get("batch", ""),
                         rec.get("cluster", ""), rec.get("job_id", ""), "requeued" in rec))
    return out


def status_key(prefix: str) -> str:
    return f"{prefix}:requeue"


STALL_INTERVALS = 3


@dataclass(slots=True)
class SweepReport:
    tracked: int = 0  # jobs with a VM recorded
    requeued: list[str] = field(default_factory=list)
    forgotten: int = 0  # records of gone VMs dropped


def sweep(rt: Runtime, requeuers: Mapping[str, Requeuer], rep: SweepReport | None = None) -> list[str]:
    """One pass; returns the job keys this caller requeued (``rep``: filled in as the pass goes)."""
    from batch_hooks.proto import job_acl_user

    prefix = rt.store.keys.prefix
    rep = rep if rep is not None else SweepReport()
    done = rep.requeued
    jobs = _read(rt)
    rep.tracked = len(jobs)
    for job in to_forget(jobs):
        rt.store.r.execute_command("ACL", "DELUSER", job_acl_user(prefix, job.job_key))  # type: ignore[no-untyped-call]
        rt.store.r.delete(jobvm_key(prefix, job.job_key))
        rt.store.r.srem(jobvms_key(prefix), job.job_key)
        rep.forgotten += 1
    failed: Exception | None = None
    for job in to_requeue(jobs):
        requeuer = requeuers.get(job.batch)
        if requeuer is None:
            continue
        if not rt.store.r.hsetnx(jobvm_key(prefix, job.job_key), "requeued", str(time.time())):
            continue  # another sweeper took it
        try:
            requeuer.requeue(job.cluster, job.job_id)
        except Exception as err:  # any failure (a batch client's, ours): the job must be tried again
            # Give the mark back: a requeue that did not happen must be tried again, or the job is lost.
            # The other jobs still get theirs in this pass (one bad schedd holds nobody else up); each
            # failure is logged, the first is raised at the end, for the loop's record.
            rt.store.r.hdel(jobvm_key(prefix, job.job_key), "requeued")
            log.warning("requeue of %s job %s:%s failed (tried again next pass): %s: %s", job.batch,
                        job.cluster, job.job_id, type(err).__name__, err)
            failed = failed or err
            continue
        rt.store.add_event("job_requeued", instance=job.instance,
                           message=f"{job.batch}:{job.cluster}:{job.job_id}: its VM is {job.state}")
        done.append(job.job_key)
    if failed is not None:
        raise failed
    return done


def requeuers_for(batch: str) -> dict[str, Requeuer]:
    """The requeuer of the site's batch system (``pools.batch``): Slurm's ``scontrol requeue``, HTCondor's
    vacate; none for the rest (their jobs are requeued by their own prolog/epilog semantics)."""
    if batch == "slurm":
        return {"slurm": SlurmRequeue()}
    if batch == "htcondor":
        from batch_hooks.condor_requeue import CondorVacate

        return {"htcondor": CondorVacate()}
    return {}


def record(rt: Runtime, rep: SweepReport | None, worker: str, interval_s: float, error: str = "") -> None:
    """The last pass of any worker's loop (last writer wins: each pass is a fact of its own), for
    ``dynvm status``."""
    now = rt.store.redis_time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    key = status_key(rt.store.keys.prefix)
    fields = {"last_run": stamp, "last_run_ts": f"{now:.3f}", "worker": worker,
              "interval_s": f"{interval_s:g}", "last_error": error[:300]}
    if rep is not None:
        fields.update(last_ok=stamp, tracked=str(rep.tracked), last_requeued=str(len(rep.requeued)),
                      last_forgotten=str(rep.forgotten))
    pipe = rt.store.r.pipeline(transaction=True)
    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
    if rep is not None:
        pipe.hincrby(key, "runs", 1)
        pipe.hincrby(key, "requeued", len(rep.requeued))
        pipe.hincrby(key, "forgotten", rep.forgotten)
    else:
        pipe.hincrby(key, "errors", 1)
    pipe.execute()


def run_forever(rt: Runtime, requeuers: Mapping[str, Requeuer], stop: threading.Event,
                interval_s: float = 5.0, worker: str = "-") -> None:
    """Sweep until stopped; any exception is logged and recorded, and the loop goes on."""
    while not stop.is_set():
        rep = SweepReport()
        try:
            sweep(rt, requeuers, rep)
            record(rt, rep, worker, interval_s)
        except Exception as exc:
            log.exception("lost-VM sweep failed")
            try:
                # What the pass did before it failed still counts (a requeue done is done).
                record(rt, None, worker, interval_s, f"{type(exc).__name__}: {exc}")
                if rep.requeued:
                    rt.store.r.hincrby(status_key(rt.store.keys.prefix), "requeued", len(rep.requeued))
            except Exception:
                log.exception("lost-VM sweep: cannot record the failure")
        stop.wait(interval_s)


def describe(raw: dict[str, str], now: float) -> str:
    """One line about the loop's last pass (pure): STALLED when no worker swept for STALL_INTERVALS."""
    if not raw:
        return "never ran"
    interval = float(raw.get("interval_s") or 5.0)
    age = now - float(raw.get("last_run_ts") or 0)
    stalled = age > STALL_INTERVALS * interval
    head = f"STALLED: no pass for {age:.0f} s (interval {interval:g} s); " if stalled else ""
    err = f"; last error: {raw['last_error']}" if raw.get("last_error") else ""
    return (f"{head}last run {raw.get('last_run', '-')} by {raw.get('worker', '-')}, "
            f"last good {raw.get('last_ok', '-')}, {raw.get('runs', '0')} passes, "
            f"{raw.get('errors', '0')} errors, "
            f"{raw.get('tracked', '0')} jobs with a VM, {raw.get('requeued', '0')} requeued{err}")


def requeue_line(rt: Runtime) -> str:
    raw = as_str_dict(rt.store.r.hgetall(status_key(rt.store.keys.prefix)))
    if rt.config.pools.batch != "slurm":
        return "not run by the workers (pools.batch is not slurm); " + (describe(raw, rt.store.redis_time())
                                                                         if raw else "never ran")
    return describe(raw, rt.store.redis_time())
