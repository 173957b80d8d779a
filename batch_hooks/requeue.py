"""A worker VM lost under a running job (host death, preemption, crash): dynvm requeues the job itself.

The sweep walks the jobs that have a VM recorded (``<prefix>:jobvms``); a job whose VM is ``lost`` or
``failed`` is requeued through its batch system once (``HSETNX requeued`` on the job's record decides who
does it when several workers sweep), and an event ``job_requeued`` records it.  The requeued attempt's
prolog gets a fresh VM (new attempt, new idempotency key).  A VM that went away because the epilog released
it is ``stopping``/``gone``, never lost, so a job that ended normally is never requeued.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
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


def sweep(rt: Runtime, requeuers: Mapping[str, Requeuer]) -> list[str]:
    """One pass; returns the job keys this caller requeued."""
    from batch_hooks.proto import job_acl_user

    prefix = rt.store.keys.prefix
    done = []
    jobs = _read(rt)
    for job in to_forget(jobs):
        rt.store.r.execute_command("ACL", "DELUSER", job_acl_user(prefix, job.job_key))  # type: ignore[no-untyped-call]
        rt.store.r.delete(jobvm_key(prefix, job.job_key))
        rt.store.r.srem(jobvms_key(prefix), job.job_key)
    for job in to_requeue(jobs):
        requeuer = requeuers.get(job.batch)
        if requeuer is None:
            continue
        if not rt.store.r.hsetnx(jobvm_key(prefix, job.job_key), "requeued", str(time.time())):
            continue  # another sweeper took it
        try:
            requeuer.requeue(job.cluster, job.job_id)
        except Exception:
            # Give the mark back: a requeue that did not happen must be tried again, or the job is lost.
            rt.store.r.hdel(jobvm_key(prefix, job.job_key), "requeued")
            raise
        rt.store.add_event("job_requeued", instance=job.instance,
                           message=f"{job.batch}:{job.cluster}:{job.job_id}: its VM is {job.state}")
        done.append(job.job_key)
    return done


def run_forever(rt: Runtime, requeuers: Mapping[str, Requeuer], stop: threading.Event,
                interval_s: float = 5.0) -> None:
    """Sweep until stopped; any exception is logged and the loop goes on."""
    while not stop.is_set():
        try:
            sweep(rt, requeuers)
        except Exception:
            log.exception("lost-VM sweep failed")
        stop.wait(interval_s)
