"""HTCondor starter hooks with real ClassAds as a schedd writes them (tests/data/htcondor/), the real hook
protocol on stdin/stdout, and the trusted side checking every claim against the schedd's copy.  No HTCondor
daemons can run here: the schedd's copy comes from a hand-written lookup over the same canned ads, and the
no-pool / silent-collector paths are exercised with the real htcondor2 bindings."""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import classad2
import pytest

from batch_hooks.condor_verify import Htcondor2Schedd
from batch_hooks.htcondor import context_from_ad, read_ad
from batch_hooks.proto import hooks_key
from batch_hooks.resp import LightRedis, RedisReplyError
from batch_hooks.server import handle
from provisioner.errors import DeadlineExceeded, UnavailableError, ValidationError
from provisioner.model import InstanceState
from tests.batch_hooks.conftest import user_url
from tests.control.conftest import Farm

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
ADS = Path(__file__).resolve().parents[1] / "data" / "htcondor"


def ad(name: str) -> Any:
    return read_ad(io.StringIO((ADS / name).read_text()))


class CannedSchedd:
    """The schedd's copy of each job: the canned cms001 ad, whatever the hook's stdin claims."""

    def __init__(self) -> None:
        truth = ad("job-cms.ad")
        self.jobs: dict[str, Mapping[str, Any]] = {}
        for gid in ("ce01.example.org#12.0#1764539990", "ce01.example.org#13.0#1764539990",
                    "ce01.example.org#14.0#1764539990"):
            self.jobs[gid] = {"Owner": truth["Owner"], "x509UserProxyVOName": truth["x509UserProxyVOName"],
                              "NumJobStarts": 1, "GlobalJobId": gid}

    def job(self, schedd: str, global_id: str) -> Mapping[str, Any] | None:
        return self.jobs.get(global_id)


@pytest.fixture(scope="module")
def starter_url(hook_url: str, test_farm: Farm) -> Iterator[str]:
    """The starter hooks' Redis user: may push onto the condor list and read replies, nothing else."""
    password = secrets.token_hex(16)
    r = test_farm.rt.store.r
    r.execute_command("ACL", "SETUSER", "dynvm-starter", "reset", "on", f">{password}", "~dynvm:hooks:condor",
                      "~dynvm:hookreply:*", "-@all", "+lpush", "+blpop", "+time")
    yield user_url(hook_url, "dynvm-starter", password)
    r.execute_command("ACL", "DELUSER", "dynvm-starter")


def test_canned_ads_parse_into_the_hook_contract() -> None:
    ctx, gid = context_from_ad(ad("job-cms.ad"))
    assert gid == "ce01.example.org#12.0#1764539990"
    assert (ctx.batch, ctx.cluster, ctx.job_id, ctx.attempt) == ("htcondor", "ce01.example.org",
                                                                 "12.0.1764539990", 1)
    assert (ctx.user, ctx.cpus, ctx.memory_mib) == ("cms001", 2, 2048)
    exit_ad = ad("job-cms-exit.ad")
    assert exit_ad["ExitCode"] == 0 and context_from_ad(exit_ad)[0].key == ctx.key


@pytest.mark.parametrize("name, match", [("hostile-globalid.ad", "GlobalJobId"),
                                         ("hostile-attempt.ad", "NumJobStarts"),
                                         ("junk.ad", "GlobalJobId|parse")])
def test_hostile_ads_are_refused(name: str, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        context_from_ad(ad(name))


def hook(args: list[str], stdin: str, url: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {"PATH": os.environ["PATH"], "DYNVM_HOOK_REDIS": url, "DYNVM_PROLOG_TIMEOUT": "30"}
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "batch_hooks", "htcondor", *args], input=stdin, env=env,
                         capture_output=True, text=True, timeout=60)
    return res, time.monotonic() - t


@pytest.mark.parametrize("name", ["hostile-globalid.ad", "hostile-attempt.ad", "junk.ad"])
def test_prepare_job_refuses_hostile_ads_on_stdin_without_traceback(name: str, starter_url: str) -> None:
    res, _ = hook(["prepare-job"], (ADS / name).read_text(), starter_url)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("dynvm prepare_job:") and "Traceback" not in res.stderr


def test_prepare_job_with_no_pool_is_a_clear_error_in_bounded_time(starter_url: str) -> None:
    # The farm's control workers serve the request with the real htcondor2 bindings: no schedd here.
    res, took = hook(["prepare-job"], (ADS / "job-cms.ad").read_text(), starter_url)
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert "htcondor: cannot ask schedd 'ce01.example.org'" in res.stderr and "Traceback" not in res.stderr
    assert took < 30
    res, _ = hook(["job-exit", "exit"], (ADS / "job-cms-exit.ad").read_text(), starter_url)
    assert res.returncode == 0  # JOB_EXIT's status is ignored by the starter; the error is logged
    res, _ = hook(["job-exit", "reboot"], (ADS / "job-cms-exit.ad").read_text(), starter_url)
    assert res.returncode == 0 and "unknown reason" in res.stderr


def test_starter_user_cannot_use_the_trusted_list(starter_url: str) -> None:
    with LightRedis(starter_url) as r, pytest.raises(RedisReplyError, match="NOPERM"):
        r.lpush(hooks_key("dynvm"), "{}")


def request(op: str, name: str) -> bytes:
    ctx, gid = context_from_ad(ad(name))
    return json.dumps({"v": 1, "op": op, "ctx": ctx.to_dict(), "reply": secrets.token_hex(16),
                       "expires": time.time() + 60, "global_id": gid}).encode()


def test_trusted_side_takes_the_owner_from_the_schedd_not_the_hook(farm: Farm, pool_accounts: object) -> None:
    schedd = CannedSchedd()
    _, vm = handle(farm.rt, request("condor_prepare", "job-cms-claims-atlas.ad"), time.time(), True, schedd)
    assert "error" not in vm, vm
    assert vm["vo"] == "cms" and farm.rt.store.require_instance(vm["instance"]).vo == "cms"
    assert "job_password" not in vm  # an unauthenticated caller gets no job credential
    # Any job's starter hook could send an exit for this job: while the schedd shows it running, nothing
    # is released (the leak reclaimer does it once the schedd says the attempt is over).
    gid = "ce01.example.org#13.0#1764539990"
    schedd.jobs[gid] = {**schedd.jobs[gid], "JobStatus": 2}
    _, early = handle(farm.rt, request("condor_exit", "job-cms-claims-atlas.ad"), time.time(), True, schedd)
    assert early["released"] is False and early["deferred"] is True
    assert farm.rt.store.require_instance(vm["instance"]).state is InstanceState.READY
    schedd.jobs[gid] = {**schedd.jobs[gid], "JobStatus": 4}
    _, done = handle(farm.rt, request("condor_exit", "job-cms-claims-atlas.ad"), time.time(), True, schedd)
    assert done["released"] is True
    _, forged = handle(farm.rt, request("condor_prepare", "job-forged-owner.ad"), time.time(), True, schedd)
    assert forged["error"] == "invalid" and "belongs to 'cms001' per the schedd" in forged["message"]
    # Condor operations are refused on the trusted list, trusted ones on the condor list.
    _, wrong = handle(farm.rt, request("condor_prepare", "job-cms.ad"), time.time(), False, schedd)
    assert "not served on this list" in wrong["message"]


def test_a_silent_collector_is_cut_off_at_the_lookups_deadline() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        old = os.environ.get("_CONDOR_COLLECTOR_HOST")
        os.environ["_CONDOR_COLLECTOR_HOST"] = f"127.0.0.1:{silent.getsockname()[1]}"  # for the child
        try:
            t = time.monotonic()
            with pytest.raises((DeadlineExceeded, UnavailableError)):
                Htcondor2Schedd(timeout_s=2).job("ce01.example.org", "ce01.example.org#12.0#1764539990")
            assert time.monotonic() - t < 5
        finally:
            if old is None:
                del os.environ["_CONDOR_COLLECTOR_HOST"]
            else:
                os.environ["_CONDOR_COLLECTOR_HOST"] = old
    assert classad2.quote('a"b') == '"a\\"b"'
