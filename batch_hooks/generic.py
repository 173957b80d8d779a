"""``dynvm hook generic prolog|epilog`` for LSF, PBS/Torque and Grid Engine (root prolog/epilog; light path).

The job comes from flags, else from the system's environment (``--system``); uid and gid are looked up
from the user name here, and the trusted daemon checks the pair again and derives the VO from the pool
account's group (never from job text).  Exit codes follow each system's prolog convention:

- sge: queue ``prolog``/``epilog`` run as ``root@``; job from JOB_ID, SGE_TASK_ID, USER, QUEUE, NSLOTS;
  exit 0 ok, 99 reschedule (transient), 100 job error state (permanent).
- lsf: ``PRE_EXEC``/``POST_EXEC`` as root; job from LSB_JOBID, LSB_JOBINDEX, LSFUSER (or USER), LSB_QUEUE,
  LSB_DJOB_NUMPROC; exit 0 ok, 1 requeue, 99 fail.
- pbs: Torque ``prologue``/``epilogue`` (root); job from flags built from the script's arguments
  (``--job-id "$1" --user "$2" --queue "$6"``); exit 0 ok, 2 requeue, 1 abort.

The LSF and PBS codes are the documented conventions of those systems as we read them; they are not
tested here (no LSF or PBS on these machines).  The epilog always exits 0.
"""

from __future__ import annotations

import pwd
import socket
import sys
from collections.abc import Mapping
from typing import Any

from batch_hooks.context import JobContext
from provisioner.errors import DynvmError, PermanentError, ValidationError

CODES = {"sge": (99, 100), "lsf": (1, 99), "pbs": (2, 1), None: (1, 2)}  # (transient, permanent)
ENV = {
    "sge": {"job_id": "JOB_ID", "user": "USER", "queue": "QUEUE", "cpus": "NSLOTS", "task": "SGE_TASK_ID"},
    "lsf": {"job_id": "LSB_JOBID", "user": "LSFUSER", "queue": "LSB_QUEUE", "cpus": "LSB_DJOB_NUMPROC",
            "task": "LSB_JOBINDEX"},
    "pbs": {},
}


def context(opts: Mapping[str, Any], env: Mapping[str, str], system: str | None) -> JobContext:
    names = ENV.get(system or "", {}) if system else {}

    def pick(flag: str, key: str) -> Any:
        value = opts.get(flag)
        return value if value is not None else (env.get(names[key]) if key in names else None)

    job_id, user = pick("job_id", "job_id"), pick("user", "user")
    if system == "lsf" and user is None:
        user = env.get("USER")
    if not job_id or not user:
        raise ValidationError("give --job-id and --user (or --system with its environment)")
    task = env.get(names["task"]) if "task" in names else None
    if task and task not in ("0", "undefined") and task.isdigit():
        job_id = f"{job_id}_{task}"  # array task: its own VM
    try:
        pw = pwd.getpwnam(str(user))
    except KeyError:
        raise ValidationError(f"user {str(user)[:32]!r} has no passwd entry here") from None
    cpus = pick("cpus", "cpus")
    node = opts.get("node") or (socket.gethostname().split(".")[0] if system else None)
    return JobContext(
        batch=system or "pbs", cluster=opts.get("cluster") or env.get("DYNVM_CLUSTER") or (system or "batch"),
        job_id=str(job_id), attempt=int(opts.get("attempt") or 0), user=pw.pw_name, uid=pw.pw_uid,
        gid=pw.pw_gid, cpus=int(cpus) if cpus is not None and str(cpus).isdigit() else 1,
        memory_mib=opts.get("memory_mib"), walltime_s=opts.get("walltime_s"),
        partition=pick("queue", "queue"), node=node,
    )


STR_FLAGS = ("job-id", "user", "cluster", "queue", "node", "system")
INT_FLAGS = ("attempt", "cpus", "memory-mib", "walltime-s")


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """``--name value`` pairs of ``dynvm hook generic`` without argparse (the light entry point)."""
    if len(argv) % 2:
        raise ValidationError("generic hook: flags come as --name value pairs")
    opts: dict[str, Any] = {}
    for name, value in zip(argv[0::2], argv[1::2], strict=True):
        flag = name.removeprefix("--")
        if flag in STR_FLAGS:
            opts[flag.replace("-", "_")] = value
        elif flag in INT_FLAGS and value.isdigit() and len(value) < 10:
            opts[flag.replace("-", "_")] = int(value)
        else:
            raise ValidationError(f"generic hook: bad flag {name[:32]!r} {value[:32]!r}")
    return opts


def run(op: str, opts: Mapping[str, Any], env: Mapping[str, str], system: str | None) -> int:
    from batch_hooks.hookcfg import connect, prefix, prolog_timeout
    from batch_hooks.proto import call

    system = system or opts.get("system")
    transient, permanent = CODES.get(system, CODES[None])
    try:
        if op not in ("prolog", "epilog"):
            raise ValidationError(f"generic hook: unknown operation {op[:32]!r}")
        ctx = context(opts, env, system)
        with connect(env) as r:
            vm = call(r, prefix(env), op, ctx, prolog_timeout(env) if op == "prolog" else 60.0)
        if op == "prolog":
            sys.stdout.write(f"DYNVM_VM={vm['instance']}\nDYNVM_VM_HOST={vm['host']}\n")
        return 0
    except PermanentError as err:
        sys.stderr.write(f"dynvm {op}: {err}\n")
        return 0 if op == "epilog" else permanent
    except DynvmError as err:
        sys.stderr.write(f"dynvm {op}: {err}\n")
        return 0 if op == "epilog" else transient
