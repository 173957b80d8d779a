"""Requeue an HTCondor job whose worker VM was lost: ``condor_vacate_job`` through htcondor2.

A vacated job goes back to idle and is matched again; its next run is a new attempt (the schedd counts
``NumShadowStarts`` up) and gets a fresh VM.  Implements batch_hooks.requeue.Requeuer for jobs recorded
with ``batch = "htcondor"`` (cluster = the schedd's name, job id = ``cluster.proc.qdate``).  Like the
schedd lookup (batch_hooks.condor_verify) it runs in a child process killed at the deadline: htcondor2
blocks in C++ holding the GIL when a collector or schedd does not answer.
"""

from __future__ import annotations

import re
import subprocess
import sys

from provisioner.errors import DeadlineExceeded, UnavailableError, ValidationError

JOB_ID_RE = re.compile(r"^([0-9]{1,10})\.([0-9]{1,7})\.[0-9]{1,12}$")
SCHEDD_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_VACATE = """
import sys
import htcondor2
schedd_name, job = sys.argv[1], sys.argv[2]
try:
    s = htcondor2.Schedd()
except htcondor2.HTCondorException:
    s = htcondor2.Schedd(htcondor2.Collector().locate(htcondor2.DaemonType.Schedd, schedd_name))
result = s.act(htcondor2.JobAction.Vacate, job, reason="dynvm: the job's worker VM was lost")
ok = result.get("TotalSuccess", 0)
if ok != 1:
    sys.exit("schedd did not vacate " + job + ": " + str(result.get("TotalNotFound", 0)) + " not found, "
             + str(result.get("TotalBadStatus", 0)) + " not running")
"""


class CondorVacate:
    """batch_hooks.requeue.Requeuer for HTCondor (not wired into ``dynvm hook watch-lost`` yet)."""

    def __init__(self, timeout_s: float = 20.0) -> None:
        self.timeout_s = timeout_s

    def requeue(self, cluster: str, job_id: str) -> None:
        m = JOB_ID_RE.fullmatch(job_id)
        if m is None or not SCHEDD_RE.fullmatch(cluster):
            raise ValidationError(f"htcondor job {cluster[:64]!r}/{job_id[:32]!r} is malformed")
        job = f"{m.group(1)}.{m.group(2)}"
        argv = [sys.executable, "-c", _VACATE, cluster, job]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise DeadlineExceeded(f"htcondor: schedd {cluster!r} did not vacate {job} in "
                                   f"{self.timeout_s:.0f} s") from None
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no detail"])[-1]
            raise UnavailableError(f"htcondor: cannot vacate {job} on schedd {cluster!r}: {last[:160]}")
