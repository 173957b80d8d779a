"""The trusted side's view of an HTCondor job: the schedd's own copy of the ad, by GlobalJobId.

The starter hooks run as the job's user, so the ad they send is a claim; only what the schedd recorded
(Owner, x509UserProxyVOName as the schedd set it from the proxy, NumJobStarts) decides the VO.  Lookups are
bounded in time: a pool that is absent fails at once ("Unable to locate local daemon"), a collector or
schedd that never answers is cut off after ``timeout_s`` instead of HTCondor's own 60 s QUERY_TIMEOUT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from provisioner.errors import DeadlineExceeded, UnavailableError

if TYPE_CHECKING:
    from batch_hooks.context import JobContext
    from provisioner.runtime import Runtime

PROJECTION = ["Owner", "GlobalJobId", "NumJobStarts", "JobStatus", "x509UserProxyVOName", "RequestCpus"]


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
out = {k: ads[0].get(k) for k in projection} if ads else None
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


def serve_condor(rt: Runtime, body: Mapping[str, Any], ctx: JobContext, deadline: float,
                 lookup: ScheddLookup) -> dict[str, Any]:
    """Check the starter hook's claims against the schedd's copy, then provision or release.

    The owner must be the schedd's; the VO follows from it (and from the schedd's proxy VO, where
    configured), never from an attribute the job set.  No per-job credential goes back: the caller is
    not authenticated beyond being some job's starter hook (payload wrapping for HTCondor is not built)."""
    from batch_hooks.server import epilog, prolog
    from provisioner.errors import NotFoundError, ValidationError

    global_id = body.get("global_id")
    if not isinstance(global_id, str) or len(global_id) > 200:
        raise ValidationError("condor request: malformed global_id")
    ad = lookup.job(ctx.cluster, global_id)
    if ad is None:
        raise NotFoundError(f"htcondor: the schedd has no job {global_id[:80]!r}")
    owner = ad.get("Owner")
    if owner != ctx.user:
        raise ValidationError(f"htcondor: job {global_id[:80]!r} belongs to {str(owner)[:32]!r} per the "
                              f"schedd, not {ctx.user!r} as its hook claims")
    if body.get("op") == "condor_exit":
        return epilog(rt, ctx)
    proxy_vo = ad.get("x509UserProxyVOName")
    vm = prolog(rt, ctx, deadline, proxy_vo if isinstance(proxy_vo, str) else None)
    return {k: v for k, v in vm.items() if k not in ("job_user", "job_password")}
