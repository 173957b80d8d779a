"""Leak reclaim, the decision: which worker VMs to take back because their job is gone or overdue.

Epilogs do not always run (a scancel during a controller restart, a crashed EpilogSlurmctld), so a worker
VM can outlive its job.  Pure (STYLE 2, 16): one row per observation, over a snapshot of the batch system
(every job it knows, from ONE ``squeue`` call) and the VMs' records; batch_hooks.demand does the reading
and the releasing.

    batch read  VM owned by      owner's job                   VM age          verdict
    failed      -                -                             -               keep (never act on a bad read)
    ok          no (pool, svc)   -                             -               keep (not ours to judge)
    ok          other cluster    -                             -               keep
    ok          a job            -                             < grace         keep (prolog may be recording)
    ok          a job            missing, or ended (CD, CA..)  >= grace        reclaim: job gone
    ok          a job            known, no walltime            -               keep
    ok          a job            known                         > wall + grace  reclaim: past walltime
    ok          a job            known                         <= wall + grace keep
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# squeue %T states after which a job never runs again.
ENDED_JOB_STATES = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
    "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED",
})


class Action(StrEnum):
    KEEP = "keep"
    RECLAIM = "reclaim"


@dataclass(frozen=True, slots=True)
class BatchJob:
    job_id: str
    state: str  # squeue %T (PENDING, RUNNING, COMPLETING, ...)
    walltime_s: int | None  # None: unlimited


@dataclass(frozen=True, slots=True)
class WorkerVM:
    id: str
    owner: str | None  # "slurm:<cluster>:<job id>" for a job's VM (batch_hooks.context.JobContext.owner)
    created: float  # Redis clock


@dataclass(frozen=True, slots=True)
class ReclaimVerdict:
    vm: str
    action: Action
    why: str = ""


def owner_job(owner: str | None, batch: str, cluster: str) -> str | None:
    """The job id if ``owner`` is a job of this batch system and cluster, else None."""
    if owner is None:
        return None
    parts = owner.split(":")
    if len(parts) != 3 or parts[0] != batch or parts[1] != cluster or not parts[2]:
        return None
    return parts[2]


def judge(vm: WorkerVM, jobs: dict[str, BatchJob], batch: str, cluster: str, now: float,
          grace_s: float) -> ReclaimVerdict:
    job_id = owner_job(vm.owner, batch, cluster)
    if job_id is None:
        return ReclaimVerdict(vm.id, Action.KEEP, "not a job of this cluster")
    age = now - vm.created
    if age < grace_s:
        return ReclaimVerdict(vm.id, Action.KEEP, "younger than the grace")
    job = jobs.get(job_id)
    if job is None or job.state in ENDED_JOB_STATES:
        seen = "no longer in the batch system" if job is None else f"ended ({job.state})"
        return ReclaimVerdict(vm.id, Action.RECLAIM, f"job {job_id} {seen}")
    if job.walltime_s is None:
        return ReclaimVerdict(vm.id, Action.KEEP, "job known, no walltime")
    if age > job.walltime_s + grace_s:
        return ReclaimVerdict(vm.id, Action.RECLAIM,
                              f"job {job_id} walltime {job.walltime_s} s + grace {grace_s:.0f} s passed "
                              f"(VM age {age:.0f} s)")
    return ReclaimVerdict(vm.id, Action.KEEP, "job known, within walltime")


def judge_all(vms: list[WorkerVM], jobs: dict[str, BatchJob] | None, batch: str, cluster: str,
              now: float, grace_s: float) -> list[ReclaimVerdict]:
    """Verdicts for every VM; ``jobs`` None means the batch system could not be read: keep everything."""
    if jobs is None:
        return [ReclaimVerdict(v.id, Action.KEEP, "batch system not read") for v in vms]
    return [judge(v, jobs, batch, cluster, now, grace_s) for v in vms]
