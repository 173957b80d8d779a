"""The trusted side's view of an HTCondor job: the schedd's own copy of the ad, by GlobalJobId.

The starter hooks run as the job's user, so the ad they send is a claim; only what the schedd recorded
(Owner, x509UserProxyVOName as the schedd set it from the proxy, NumJobStarts) decides the VO.  Lookups are
bounded in time: a pool that is absent fails at once ("Unable to locate local daemon"), a collector or
schedd that never answers is cut off after ``timeout_s`` instead of HTCondor's own 60 s QUERY_TIMEOUT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from provisioner.errors import DeadlineExceeded, UnavailableError

PROJECTION = ["Owner", "GlobalJobId", "NumJobStarts", "JobStatus", "x509UserProxyVOName", "RequestCpus",
              "RequestMemory", "NumShadowStarts", "JobRunCount", "RemoteHost"]


class ScheddLookup(Protocol):
    def job(self, schedd: str, global_id: str) -> Mapping[str, Any] | None:
        """The schedd's copy of the job's ad (PROJECTION attributes), or None if it has no such job."""
        ...


_QUERY = """
import json, sys
import classad2, htcondor2
schedd_name, global_id, projection = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
try:
    s = htcondor2.Schedd()
except htcondor2.HTCondorException:
    s = htcondor2.Schedd(htcondor2.Collector().locate(htcondor2.DaemonType.Schedd, schedd_name))
ads = s.query(constraint="GlobalJobId == " + classad2.quote(global_id), projection=projection)
def value(ad, k):
    try:
        return ad.eval(k) if k in ad else None  # RequestMemory is often an expression
    except Exception:
        return None
out = {k: value(ads[0], k) for k in projection} if ads else None
json.dump({"ad": {k: v for k, v in out.items() if isinstance(v, (str, int, float, bool))} if out else None},
          sys.stdout)
"""


class Htcondor2Schedd:
    """ScheddLookup through htcondor2 (the local schedd, or the named one located via the collector).

    The query runs in a child process killed at the deadline: htcondor2 blocks in C++ holding the GIL
    (measured: a silent collector stalled the whole process for 120 s despite a thread-side timeout)."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s

    def job(self, schedd: str, global_id: str) -> Mapping[str, Any] | None:
        import json
        import subprocess
        import sys

        argv = [sys.executable, "-c", _QUERY, schedd, global_id, ",".join(PROJECTION)]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            took = f"{self.timeout_s:.0f} s"
            raise DeadlineExceeded(f"htcondor: schedd {schedd!r} did not answer in {took}") from None
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no detail"])[-1]
            raise UnavailableError(f"htcondor: cannot ask schedd {schedd!r}: {last[:160]}")
        try:
            ad: Mapping[str, Any] | None = json.loads(res.stdout)["ad"]
        except (ValueError, KeyError, TypeError):
            raise UnavailableError(f"htcondor: garbled answer about schedd {schedd!r}") from None
        return ad

