"""``dynvm demo``'s batch part: jobs of three VOs submitted the ordinary way (plain ``sbatch`` by each VO's
pool account, on a private Slurm cluster beside the farm) land in VMs of their own VO's image, and a warm-pool
hit is shown beside a cold start.  Without Slurm the warm/cold pair runs through the hook path directly
(the prolog request a batch system's hook sends)."""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from provisioner.errors import DeadlineExceeded, DynvmError

if TYPE_CHECKING:
    from batch_hooks.demand import JobSource, Reading
    from provisioner.farm.slurm import SlurmCluster
    from provisioner.model import Instance
    from provisioner.runtime import Runtime

Say = Callable[[str], None]
WARM_VO = "cms"
# An ordinary batch script; dynvm's TaskProlog exported the job's own VM into its environment.
JOB_SCRIPT = """#!/bin/sh
[ -n "$DYNVM_VM" ] || { echo "no dynvm VM was exported to this job"; exit 1; }
echo "DYNVM_VM=$DYNVM_VM DYNVM_VM_HOST=$DYNVM_VM_HOST user=$(id -un) group=$(id -gn) node=$SLURMD_NODENAME"
sleep 1
"""
JOB_ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                       "BOOT_FAIL", "DEADLINE", "PREEMPTED"})
POLL_S = 0.05


def slurm_unavailable(no_slurm: bool) -> str | None:
    """Why the demo cannot run its jobs through Slurm here (one line), or None."""
    from provisioner.farm.slurm import missing_programs, shipped_hooks_dir

    direct = "requesting the VMs directly"
    if no_slurm:
        return f"--no-slurm: {direct}"
    missing = missing_programs()
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not on PATH; deploy/install.sh installs "
                f"slurm-wlm and munge): {direct}")
    if os.geteuid() != 0:
        return f"Slurm is installed but the demo's private cluster needs root (SlurmUser=root): {direct}"
    if shipped_hooks_dir() is None:
        from provisioner.catalogue.shipped import deploy_dir

        return (f"Slurm is installed but this dynvm's Slurm hooks are missing from {deploy_dir() / 'slurm'} "
                f"(reinstall dynvm): {direct}")
    return None


def ms(seconds: float) -> int:
    return round(seconds * 1000)


# -- the warm pool: one demand-watcher cycle, run here (no watcher daemon needed) -----------------------


class NoBatch:
    """The demand source when there is no batch system: no pending jobs (the pool's min decides)."""

    name = "none"

    def read(self) -> Reading:
        from batch_hooks.demand import Reading

        return Reading()


def _warm_member(rt: Runtime, vo: str) -> Instance | None:
    from batch_hooks.watcher import pool_state
    from provisioner.model import InstanceState, Tier

    for iid in pool_state(rt).members(vo):
        inst = rt.store.get_instance(iid)
        if inst and inst.state is InstanceState.READY and inst.owner is None and inst.tier is Tier.POOL:
            return inst
    return None


def fill_warm_pool(rt: Runtime, source: JobSource, say: Say, timeout_s: float) -> Instance:
    """Give WARM_VO a pool of one (as ``dynvm pool set cms --min 1 --max 1``), run one cycle of the demand
    watcher (the code the watcher runs) and wait until its VM is ready and idle."""
    from batch_hooks.pools import PoolSettings
    from batch_hooks.watcher import cycle, pool_state

    pool_state(rt).set_settings(WARM_VO, PoolSettings(1, 1, 3600.0), None)
    t0 = time.monotonic()
    rep = cycle(rt, source)
    notes = f" ({'; '.join(rep.notes)})" if rep.notes else ""
    say(f"warm pool: {WARM_VO} keeps 1 VM warm (`dynvm pool set {WARM_VO} --min 1 --max 1`); one demand-"
        f"watcher cycle ({source.name}: {sum(rep.pending.values())} pending) started "
        f"{rep.started.get(WARM_VO, 0)} pool VM{notes}")
    deadline = t0 + timeout_s
    while (inst := _warm_member(rt, WARM_VO)) is None:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"demo: no warm {WARM_VO} VM ready after {timeout_s:.0f} s{notes}")
        time.sleep(POLL_S)
    say(f"warm pool: {inst.id} ({inst.image}) ready and idle on {inst.host}, owned by no job "
        f"({ms(time.monotonic() - t0)} ms)")
    return inst


def side_by_side(cold: list[tuple[str, float]], warm: list[tuple[str, float]]) -> str:
    """'cold start: job → VM ready X ms  vs  warm-pool hit: Y ms' (medians; each job's figure after)."""
    def fig(xs: list[tuple[str, float]]) -> str:
        if not xs:
            return "-"
        each = ", ".join(f"{who} {ms(s)}" for who, s in xs)
        return f"{ms(statistics.median(s for _, s in xs))} ms" + (f" ({each})" if len(xs) > 1 else "")
    return f"cold start: job → VM ready {fig(cold)}  vs  warm-pool hit: {fig(warm)}"


# -- Slurm: one sbatch job per VO and pool account, followed to its VM's release --------------------------


@dataclass
class JobRun:
    job: str
    user: str
    vo: str
    submitted: float  # monotonic, just before sbatch
    submitted_wall: float  # the same moment, wall clock (VM records carry wall-clock times)
    vm: str = ""
    image: str = ""
    host: str = ""
    node: str = ""
    warm: bool = False
    started_at: float = 0.0  # first seen out of PENDING: Slurm started it, PrologSlurmctld runs
    ready_at: float = 0.0  # the prolog recorded the job's VM (it is ready and the job's)
    prolog_s: float | None = None  # Slurm started the job -> its VM noted on it (slurmctld's log, ms)
    running_at: float = 0.0
    ended_at: float = 0.0
    released_at: float = 0.0
    state: str = "PENDING"
    exit_code: str = ""
    problem: str = ""

    @property
    def done(self) -> bool:
        return bool(self.ended_at) and (bool(self.released_at) or not self.vm)

    def vm_ready_ms(self) -> int | None:
        """Slurm started the job (its PrologSlurmctld began) -> the job's VM handed over: from slurmctld's
        log where it says, else as polled here."""
        if self.prolog_s is not None:
            return ms(self.prolog_s)
        return ms(self.ready_at - self.started_at) if self.ready_at and self.started_at else None

    def row(self) -> dict[str, Any]:
        def since(t: float) -> int | None:
            return ms(t - self.submitted) if t else None

        return {"job": self.job, "user": self.user, "vo": self.vo, "vm": self.vm, "image": self.image,
                "host": self.host, "node": self.node, "start": "warm" if self.warm else "cold",
                "vm_ready_ms": self.vm_ready_ms(), "sbatch_to_running_ms": since(self.running_at),
                "state": self.state, "exit": self.exit_code, "released": bool(self.released_at),
                "problem": self.problem}


def was_warm(rt: Runtime, vm: str, submitted_wall: float) -> bool:
    """A warm-pool hit: the job's VM existed before the job was submitted (a cold one is created by the
    job's prolog)."""
    inst = rt.store.get_instance(vm)
    return inst is not None and 0 < inst.created < submitted_wall


def _observe(rt: Runtime, cluster: SlurmCluster, r: JobRun, info: dict[str, str], say: Say) -> None:
    """One look at a job: its VM (from the record the prolog wrote), its Slurm state, its VM's release."""
    from batch_hooks.proto import jobvm_key
    from provisioner.idempotency import job_key
    from provisioner.model import InstanceState

    now = time.monotonic()
    attempt = int(info.get("Restarts", "0") or 0) if info.get("Restarts", "0").isdigit() else 0
    if not r.vm:
        rec = rt.store.r.hgetall(jobvm_key(rt.store.keys.prefix, job_key(cluster.name, r.job, attempt)))
        if rec:
            r.vm, r.image, r.host = str(rec["instance"]), str(rec["image"]), str(rec["host"])
            r.ready_at, r.warm = now, was_warm(rt, r.vm, r.submitted_wall)
            how = "warm-pool hit" if r.warm else "cold start"
            say(f"job {r.job}: VM {r.vm} ({r.image}) on {r.host} handed over by PrologSlurmctld: {how}, "
                f"{ms(now - r.submitted)} ms after sbatch")
    state = info.get("JobState", r.state)
    if state != "PENDING" and info and not r.started_at:
        r.started_at = now
    if state == "RUNNING" and not r.running_at:
        r.running_at, r.node = now, info.get("NodeList", "")
        say(f"job {r.job}: RUNNING on node {r.node} with VM {r.vm or '?'} ({r.image or '?'})")
    if state in JOB_ENDED and not r.ended_at:
        if not r.running_at:  # it ran between two looks
            r.running_at, r.node = now, info.get("NodeList", "")
            say(f"job {r.job}: ran on node {r.node} (its RUNNING fell between two looks)")
        if not r.vm:  # its VM came and went between two looks: the job attempt's idempotency key names it
            inst = rt.store.instance_for_key(job_key(cluster.name, r.job, attempt))
            if inst is not None:
                r.vm, r.image, r.host = inst.id, inst.image, inst.host or ""
                r.warm = was_warm(rt, r.vm, r.submitted_wall)
        r.ended_at, r.exit_code = now, info.get("ExitCode", "")
        say(f"job {r.job}: {state} (exit {r.exit_code})")
    if state == "PENDING" and info.get("Reason") == "JobHeldAdmin" and not r.ended_at:
        note = info.get("AdminComment", "")
        r.ended_at, r.problem = now, (note if note.startswith("dynvm: ") else "held by the prolog")[:300]
        say(f"job {r.job}: held: {r.problem}")
    r.state = state
    if r.ended_at and r.vm and not r.released_at:
        inst = rt.store.get_instance(r.vm)
        if inst is None or inst.state in (InstanceState.GONE, InstanceState.FAILED, InstanceState.LOST):
            r.released_at = now
            say(f"job {r.job}: VM {r.vm} released by EpilogSlurmctld "
                f"({inst.state.value if inst else 'gone'})")


def _follow(rt: Runtime, cluster: SlurmCluster, runs: list[JobRun], say: Say, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(r.done for r in runs):
        if time.monotonic() > deadline:
            for r in runs:
                if not r.done:
                    r.problem = r.problem or f"not finished (and its VM released) after {timeout_s:.0f} s"
            return
        jobs = cluster.jobs()
        for r in runs:
            if not r.done:
                _observe(rt, cluster, r, jobs.get(r.job, {}), say)
        time.sleep(POLL_S)


# slurmctld's info lines (ms timestamps): the job started (either scheduler), the prolog noted its VM on it.
_STARTED = re.compile(
    r"^\[([0-9T:.-]+)\] (?:sched: Allocate|sched/backfill: _start_job: Started) JobId=(\d+) "
)
_NOTED = re.compile(r"^\[([0-9T:.-]+)\] _update_job: setting admin_comment to dynvm vm=.* for JobId=(\d+)$")


def prolog_spans(log_text: str) -> dict[str, float]:
    """Job id -> seconds from Slurm starting the job (PrologSlurmctld begins) to the prolog noting the
    job's VM on it (the attempt that got one)."""
    from datetime import datetime

    started: dict[str, float] = {}
    spans: dict[str, float] = {}
    for line in log_text.splitlines():
        for rx, into in ((_STARTED, started), (_NOTED, None)):
            m = rx.match(line)
            if m is None:
                continue
            try:
                t = datetime.fromisoformat(m.group(1)).timestamp()
            except ValueError:
                continue
            if into is not None:
                into[m.group(2)] = t
            elif m.group(2) in started and m.group(2) not in spans:
                spans[m.group(2)] = t - started[m.group(2)]
    return spans


def _check(rt: Runtime, cluster: SlurmCluster, r: JobRun, say: Say) -> None:
    """The job ran with a VM of its own VO's image, and says so itself (its output)."""
    from provisioner.identity import image_for_vo

    try:
        out = cluster.output(r.job).strip()
    except OSError:
        out = ""
    say(f"job {r.job} output: {out.splitlines()[0] if out else '(none)'}")
    want = image_for_vo(r.vo, rt.catalogue, rt.config).ref
    inst = rt.store.get_instance(r.vm) if r.vm else None
    if r.problem:
        return
    if r.state != "COMPLETED" or r.exit_code != "0:0":
        r.problem = f"job {r.state} exit {r.exit_code}"
    elif inst is None or inst.vo != r.vo or inst.image != want:
        r.problem = f"VM {r.vm} is not a {r.vo} VM of {want}"
    elif f"DYNVM_VM={r.vm} " not in out:
        r.problem = f"the job's output does not name its VM {r.vm}"


def play_slurm(rt: Runtime, farm_dir: Any, say: Say, vos: tuple[str, ...], per_vo: int,
               timeout_s: float) -> tuple[list[JobRun], list[tuple[str, float]], list[tuple[str, float]]]:
    """Start the farm's private Slurm, fill a warm pool, submit ``per_vo`` jobs per VO, follow them.
    Returns (runs, cold, warm) with (who, seconds from sbatch to the job's VM handed over)."""
    from batch_hooks.demand import SlurmSource
    from provisioner.farm.slurm import shipped_hooks_dir
    from provisioner.farm.slurm_demo import POOL_ACCOUNTS, ensure_pool_accounts, start_farm_slurm

    t0 = time.monotonic()
    cluster = start_farm_slurm(farm_dir, rt.config.redis_url, rt.store.r, rt.store.keys.prefix,
                               prolog_timeout_s=timeout_s)
    say(f"slurm: private cluster '{cluster.name}' up in {ms(time.monotonic() - t0)} ms: munged, slurmctld, "
        f"{len(cluster.nodes)} slurmd ({', '.join(cluster.nodes)}), SLURM_CONF={cluster.conf}")
    say(f"slurm: PrologSlurmctld / EpilogSlurmctld / TaskProlog are deploy/slurm's hooks as shipped "
        f"({shipped_hooks_dir()}); `dynvm farm down` stops this cluster too")
    ensure_pool_accounts({vo: POOL_ACCOUNTS[vo] for vo in vos})
    say("pool accounts: " + ", ".join(f"{POOL_ACCOUNTS[vo]} (group {vo})" for vo in vos))
    warm_vm = fill_warm_pool(rt, SlurmSource(env=cluster.env), say, timeout_s).id
    runs = []
    for vo in vos:
        user = POOL_ACCOUNTS[vo]
        for _ in range(per_vo):
            t, wall = time.monotonic(), time.time()
            job = cluster.sbatch(user, JOB_SCRIPT)
            runs.append(JobRun(job, user, vo, t, wall))
            say(f"job {job}: submitted by {user} (VO {vo}) with plain sbatch")
    _follow(rt, cluster, runs, say, timeout_s)
    try:
        spans = prolog_spans((cluster.base / "log" / "slurmctld.log").read_text(errors="replace"))
    except OSError:
        spans = {}
    for r in runs:
        r.prolog_s = spans.get(r.job)
        _check(rt, cluster, r, say)
    got = [(r, v / 1000) for r in runs if (v := r.vm_ready_ms()) is not None]
    cold = [(f"{r.vo} job {r.job}", s) for r, s in got if not r.warm]
    warm = [(f"{r.vo} job {r.job}", s) for r, s in got if r.warm]
    if not any(r.vm == warm_vm for r in runs):
        say(f"warm pool: VM {warm_vm} was taken by no job of this demo")
    return runs, cold, warm


# -- without Slurm: the same pair through the hook path ----------------------------------------------------


def play_hook_pair(rt: Runtime, say: Say, timeout_s: float) -> dict[str, Any] | None:
    """A cold prolog (empty pool) and then a warm one (after one watcher cycle) for two jobs of WARM_VO's
    pool account, as a batch system's hook sends them; both released by their epilogs.  None when the
    pool account is missing and cannot be created (not root)."""
    from batch_hooks.context import JobContext
    from batch_hooks.proto import call
    from batch_hooks.resp import LightRedis
    from provisioner.control.client import ENDED, wait
    from provisioner.farm.slurm_demo import POOL_ACCOUNTS, ensure_pool_accounts

    user = POOL_ACCOUNTS[WARM_VO]
    try:
        ensure_pool_accounts({WARM_VO: user})
    except DynvmError as err:
        say(f"warm pool: skipped ({err})")
        return None
    import pwd

    pw = pwd.getpwnam(user)
    prefix, base = rt.store.keys.prefix, time.time_ns() // 1000 % 10**12
    ctxs = [JobContext(batch="pbs", cluster="demo", job_id=str(base + i), attempt=0, user=user,
                       uid=pw.pw_uid, gid=pw.pw_gid) for i in (0, 1)]
    got: list[tuple[str, float, dict[str, Any]]] = []
    with LightRedis(rt.config.redis_url) as r:
        fill_warm_pool(rt, NoBatch(), say, timeout_s)
        for c in ctxs:  # the first takes the warm VM, the second finds the pool empty: a cold start
            t, wall = time.monotonic(), time.time()
            vm = call(r, prefix, "prolog", c, timeout_s)
            took = time.monotonic() - t
            how = "warm-pool hit" if was_warm(rt, vm["instance"], wall) else "cold start"
            say(f"prolog of {user}'s job {c.job_id} through the hook path: VM {vm['instance']} "
                f"({vm['image']}) on {vm['host']}: {how}, {ms(took)} ms")
            got.append((how, took, vm))
        for c, (_, _, vm) in zip(ctxs, got, strict=True):
            call(r, prefix, "epilog", c, timeout_s)
            end = wait(rt, vm["instance"], timeout_s, until=ENDED)
            say(f"epilog of job {c.job_id}: VM {vm['instance']} released ({end.state.value})")
    pairs = [(how, (f"{WARM_VO} job {c.job_id}", took)) for c, (how, took, _) in zip(ctxs, got, strict=True)]
    return {"cold": [p for how, p in pairs if how == "cold start"],
            "warm": [p for how, p in pairs if how == "warm-pool hit"],
            "vms": [vm["instance"] for _, _, vm in got]}
