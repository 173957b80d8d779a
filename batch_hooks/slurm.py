"""Slurm hooks (light path: stdlib + batch_hooks + provisioner.errors only).

``prolog-slurmctld`` (root, controller): JobContext from slurmctld's environment (SLURM_JOB_UID/GID/USER,
restart count, CPUs, partition, node list: values slurmctld sets, never the job's comment, constraint or
typed account) plus ``squeue`` for memory and time limit -> dynvm's trusted daemon -> the VM.  Outcome:
  ready      -> AdminComment ``dynvm vm=ID host=H cred=USER:PASS`` (PrivateData=jobs: only root and the
                job's owner see it), exit 0;
  transient  -> exit 1: Slurm requeues the job, no node is drained;
  permanent  -> AdminComment ``dynvm: <reason>``, ``scontrol hold``, exit 1: the job is requeued *held*
                with its reason visible in ``scontrol show job``; never requeued forever.
``epilog-slurmctld`` (root): release; always exit 0 (dynvm's reconciler catches a failed release).
``task-prolog`` (the job's user): prints ``export DYNVM_VM=...`` lines from its own job's AdminComment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping

from batch_hooks.context import JobContext
from provisioner.errors import DynvmError, PermanentError, UnavailableError, ValidationError, printable

SCONTROL_TIMEOUT_S = 20.0
MEM_RE = re.compile(r"^([0-9]{1,9})([KMGT]?)$")
TIME_RE = re.compile(r"^(?:([0-9]{1,4})-)?(?:([0-9]{1,2}):)?([0-9]{1,2}):([0-9]{1,2})$")
_MULT = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


def _env(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if value is None:
        raise ValidationError(f"{name} is not set (is this running as a Slurm PrologSlurmctld?)")
    return value


def parse_memory(text: str) -> int | None:
    """squeue %m: "0" (none), "2000M", "4G"; None when the job asked for no memory."""
    m = MEM_RE.fullmatch(text.strip())
    if m is None:
        raise ValidationError(f"squeue memory {text[:32]!r} is not understood")
    mib = int(int(m.group(1)) * _MULT[m.group(2)])
    return mib or None


def parse_walltime(text: str) -> int | None:
    """squeue %l: "UNLIMITED", "1-02:03:04", "30:00"; None when unlimited."""
    text = text.strip()
    if text in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    m = TIME_RE.fullmatch(text)
    if m is None:
        raise ValidationError(f"squeue time limit {text[:32]!r} is not understood")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s or None


def _squeue_limits(job_id: str, env: Mapping[str, str]) -> tuple[int | None, int | None]:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%m|%l"], capture_output=True, text=True,
                         env=dict(env), timeout=SCONTROL_TIMEOUT_S, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or len(lines) != 1 or lines[0].count("|") != 1:
        return None, None  # no limits known: the image's defaults apply
    mem, wall = lines[0].split("|")
    return parse_memory(mem), parse_walltime(wall)


def context_from_env(env: Mapping[str, str], with_limits: bool = True) -> JobContext:
    """The job as slurmctld describes it to PrologSlurmctld/EpilogSlurmctld."""
    job_id = _env(env, "SLURM_JOB_ID")
    nodes = env.get("SLURM_JOB_NODELIST", "")
    node = nodes if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", nodes) else None  # one node only
    cpus_text = env.get("SLURM_JOB_CPUS_PER_NODE", "1").split("(")[0].split(",")[0]
    memory, walltime = _squeue_limits(job_id, env) if with_limits else (None, None)
    return JobContext(
        batch="slurm",
        cluster=env.get("DYNVM_CLUSTER") or _env(env, "SLURM_CLUSTER_NAME"),
        job_id=job_id,
        attempt=_int_env(env, "SLURM_JOB_RESTART_COUNT", "0"),
        user=_env(env, "SLURM_JOB_USER"),
        uid=_int_env(env, "SLURM_JOB_UID"),
        gid=_int_env(env, "SLURM_JOB_GID"),
        cpus=int(cpus_text) if cpus_text.isdigit() and len(cpus_text) < 6 else 1,
        memory_mib=memory,
        walltime_s=walltime,
        partition=env.get("SLURM_JOB_PARTITION") or None,
        node=node,
    )


def _int_env(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    text = env.get(name, default)
    if text is None:
        raise ValidationError(f"{name} is not set")
    if not text.isdigit() or len(text) > 10:
        raise ValidationError(f"{name}: {text[:32]!r} is not a number")
    return int(text)


def scontrol(env: Mapping[str, str], *args: str) -> bool:
    res = subprocess.run(["scontrol", *args], env=dict(env), capture_output=True, timeout=SCONTROL_TIMEOUT_S,
                         check=False)
    return res.returncode == 0


def job_ref(env: Mapping[str, str]) -> str | None:
    """The one job record to update or show: ``ARRAYID_TASK`` for an array task (its plain id is the whole
    array's for the task that keeps the array's id), else the job id; None if malformed."""
    array, task = env.get("SLURM_ARRAY_JOB_ID", ""), env.get("SLURM_ARRAY_TASK_ID", "")
    if re.fullmatch(r"[0-9]{1,12}", array) and re.fullmatch(r"[0-9]{1,9}", task):
        return f"{array}_{task}"
    job_id = env.get("SLURM_JOB_ID", "")
    return job_id if re.fullmatch(r"[0-9]{1,12}", job_id) else None


def admin_comment(text: str) -> str:
    """One line, printable ASCII, bounded: the reason is shown by scontrol and read by the TaskProlog."""
    return printable(text, 400)


def prolog(env: Mapping[str, str]) -> int:
    from batch_hooks.hookcfg import connect, prefix, prolog_timeout
    from batch_hooks.proto import call

    job_id = env.get("SLURM_JOB_ID", "")
    try:
        ctx = context_from_env(env)
        with connect(env) as r:
            vm = call(r, prefix(env), "prolog", ctx, prolog_timeout(env))
        note = f"dynvm vm={vm['instance']} host={vm['host']} cred={vm['job_user']}:{vm['job_password']}"
        ref = job_ref(env)
        if ref is None or not scontrol(env, "update", f"jobid={ref}", f"admincomment={admin_comment(note)}"):
            raise UnavailableError(f"scontrol update jobid={ref}: failed; the job would not find its VM")
        return 0
    except PermanentError as err:
        ref = job_ref(env)
        if ref is not None:
            scontrol(env, "update", f"jobid={ref}", f"admincomment={admin_comment(f'dynvm: {err}')}")
            scontrol(env, "hold", ref)
        _say(f"dynvm prolog: job {job_id[:32]}: held: {err}")
        return 1
    except DynvmError as err:
        # issue 9: why a requeued job waits (its VO at its limits, its image's circuit open) is visible in
        # `scontrol show job` / `squeue -O AdminComment`; the next attempt's VM note replaces it.
        ref = job_ref(env)
        if ref is not None:
            why = admin_comment(f"dynvm: requeued: {err}")
            scontrol(env, "update", f"jobid={ref}", f"admincomment={why}")
        _say(f"dynvm prolog: job {job_id[:32]}: requeued: {err}")
        return 1


def epilog(env: Mapping[str, str]) -> int:
    from batch_hooks.hookcfg import connect, prefix
    from batch_hooks.proto import call

    try:
        ctx = context_from_env(env, with_limits=False)
        with connect(env) as r:
            call(r, prefix(env), "epilog", ctx, 60.0)
    except DynvmError as err:
        _say(f"dynvm epilog: job {env.get('SLURM_JOB_ID', '')[:32]}: {err}")
    return 0  # never hold up the controller: dynvm's reconciler releases what a failed epilog left


NOTE_RE = re.compile(r"^dynvm vm=([A-Za-z0-9_.:-]{1,128}) host=([A-Za-z0-9_.:-]{1,128}) "
                     r"cred=([A-Za-z0-9_.:-]{1,200}):([0-9a-f]{32})\s*$")


def task_prolog(env: Mapping[str, str]) -> int:
    """Exports for the job; reads only its own job (PrivateData=jobs).  Always exit 0: a TaskProlog failure
    would fail the job for a reason that is not the job's."""
    ref = job_ref(env)
    if ref is None:
        return 0
    out = subprocess.run(["scontrol", "show", "job", ref], env=dict(env), capture_output=True, text=True,
                         timeout=SCONTROL_TIMEOUT_S, check=False).stdout
    notes = [ln.strip()[len("AdminComment="):] for ln in out.splitlines()
             if ln.strip().startswith("AdminComment=")]
    # Exactly one, and well-formed: a Comment the user crafted to look like a second line is refused.
    m = NOTE_RE.fullmatch(notes[0]) if len(notes) == 1 else None
    if m is not None:
        sys.stdout.write(f"export DYNVM_VM={m.group(1)}\nexport DYNVM_VM_HOST={m.group(2)}\n"
                         f"export DYNVM_JOB_CRED={m.group(3)}:{m.group(4)}\n")
    return 0


def _say(text: str) -> None:
    sys.stderr.write(admin_comment(text) + "\n")


def main(argv: list[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    ops = {"prolog-slurmctld": prolog, "epilog-slurmctld": epilog, "task-prolog": task_prolog}
    if len(argv) != 1 or argv[0] not in ops:
        _say(f"usage: python -m batch_hooks slurm {'|'.join(ops)}")
        return 2
    return ops[argv[0]](env)
