"""HTCondor jobs reach their VM only through the node daemon (batch_hooks.condor_daemon), tested as shipped.

No HTCondor daemon can run here.  What is real: the daemon's unix socket and SO_PEERCRED, a process tree
built like an execute node's (a root process named ``condor_starter`` with a real starter's command line,
``tests/data/htcondor/condor_starter``, whose children run deploy/htcondor's hook scripts and
USER_JOB_WRAPPER as pool accounts through setpriv), the hook protocol on stdin/stdout, ClassAds as a schedd
writes them (tests/data/htcondor/schedd-*.ad, parsed with classad2 into the schedd's copy), the test-driver
farm's control workers serving the trusted prolog/epilog, and the per-job Redis ACL users.  The schedd's
answers come from those canned ads (``CannedSchedd``); the real htcondor2 path (no pool) is exercised too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import classad2
import pytest

from batch_hooks.condor_daemon import CondorNodeDaemon, DaemonSettings
from batch_hooks.condor_peer import slot_from_argv
from batch_hooks.condor_verify import PROJECTION, Htcondor2Schedd
from batch_hooks.proto import jobvm_key
from batch_hooks.resp import LightRedis, RedisReplyError
from provisioner.errors import IdentityError
from provisioner.model import InstanceState
from tests.batch_hooks.conftest import user_url
from tests.batch_hooks.slurm_cluster import REPO, wait_for
from tests.control.conftest import Farm

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
DATA = Path(__file__).resolve().parents[1] / "data" / "htcondor"
DEPLOY = REPO / "deploy" / "htcondor"
STARTD = "wn01.example.org"
CMS, ATLAS, ALICE = ("ce01.example.org#21.0#1764539990", "ce01.example.org#22.0#1764539990",
                     "ce01.example.org#23.0#1764539990")
ADS = {CMS: "schedd-cms-21.ad", ATLAS: "schedd-atlas-22.ad", ALICE: "schedd-alice-23.ad"}
JOB = "#!/bin/sh\necho \"vo=$(cat /etc/vo) args=$*\"\nexit 7\n"


class CannedSchedd:
    """The schedd's copy of each job, from the canned ads, projected and evaluated as Htcondor2Schedd does."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.asked: list[str] = []
        for gid, name in ADS.items():
            ad = classad2.parseOne((DATA / name).read_text())
            self.jobs[gid] = {k: ad.eval(k) for k in PROJECTION if k in ad}

    def job(self, schedd: str, global_id: str) -> Mapping[str, Any] | None:
        self.asked.append(global_id)
        return self.jobs.get(global_id)


@dataclass
class Node:
    base: Path
    socket: str
    libexec: Path
    schedd: CannedSchedd
    daemon: CondorNodeDaemon
    node: str


def _env_file(path: Path, values: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o644)


def install_hooks(libexec: Path, sock: str, hook_url: str) -> Path:
    """deploy/htcondor's job-side scripts as shipped, with their env file (no secret in it)."""
    libexec.mkdir(mode=0o755)
    for name in ("condor-prepare-job", "condor-job-exit", "condor-job-wrapper"):
        shutil.copy2(DEPLOY / name, libexec / name)
    host, port = hook_url.rsplit("@", 1)[1].split("/")[0].split(":")
    # The job's side is stdlib-only: the pool accounts run it on the system python3 (the test venv lives
    # under /root, out of their reach), with the checkout on the path.
    _env_file(libexec / "dynvm-condor.env", {"DYNVM_PYTHON": "/usr/bin/python3", "PYTHONPATH": str(REPO),
                                             "DYNVM_CONDOR_SOCKET": sock, "DYNVM_PREFIX": "dynvm",
                                             "DYNVM_JOB_REDIS": f"redis://{host}:{port}/0",
                                             "DYNVM_PROLOG_TIMEOUT": "60"})
    return libexec


@pytest.fixture(scope="module")
def node(hook_url: str, test_farm: Farm) -> Iterator[Node]:
    """An execute node: the daemon (root, in a thread of this process) on its socket, deploy/htcondor's
    scripts installed as shipped with their env file, an EXECUTE directory the pool accounts can reach."""
    base = Path(tempfile.mkdtemp(prefix="h4-condor-"))
    base.chmod(0o755)
    (base / "execute").mkdir(mode=0o755)
    sock = str(base / "run" / "condor.sock")
    libexec = install_hooks(base / "libexec", sock, hook_url)
    hosts = sorted(h.name for h in test_farm.rt.store.list_hosts())
    settings = DaemonSettings(sock, STARTD, {"DYNVM_HOOK_REDIS": hook_url, "DYNVM_PREFIX": "dynvm",
                                             "DYNVM_PROLOG_TIMEOUT": "60"}, node=hosts[0])
    schedd = CannedSchedd()
    daemon = CondorNodeDaemon(settings, schedd)
    thread, stop = daemon.start_thread()
    yield Node(base, sock, libexec, schedd, daemon, hosts[0])
    stop.set()
    thread.join(10)
    shutil.rmtree(base, ignore_errors=True)


def starter(node: Node, user: str, slot: str, ad: str, steps: list[dict[str, Any]],
            files: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run the stand-in condor_starter (root) for one job; the results of its steps."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=node.base))
    run_dir.chmod(0o755)
    spec = {"user": user, "execute": str(node.base / "execute"), "job_ad": str(DATA / ad),
            "steps": steps, "files": dict(files or {}), "results": str(run_dir / "results.json"),
            "env": {"PYTHONPATH": str(REPO), "DYNVM_CONDOR_SOCKET": node.socket}}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    (run_dir / "spec.json").chmod(0o644)
    argv = [str(DATA / "condor_starter"), "-f", "-local-name", "slot_type_1", "-a", slot, "<127.0.0.1:9618>"]
    subprocess.run(argv, env={"DYNVM_TEST_STARTER": str(run_dir / "spec.json"), "PATH": os.environ["PATH"]},
                   check=True, timeout=600, capture_output=True)
    result: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    return result


STEP = {"condor-prepare-job": "prepare", "condor-job-wrapper": "job", "condor-job-exit": "exit"}


def hook(libexec: Path, name: str, *args: str) -> dict[str, Any]:
    """A step running one of the shipped scripts (hooks get the job ad on stdin, the wrapper does not)."""
    return {"name": STEP[name], "argv": [str(libexec / name), *args],
            "stdin": "ad" if name != "condor-job-wrapper" else None}


def probe(gid: str, op: str = "credential", name: str = "probe") -> dict[str, Any]:
    """A process of the job's user asking the daemon directly, printing the answer or the refusal."""
    code = ("import json, os, sys\nfrom batch_hooks.htcondor import ask_daemon\n"
            "try:\n    print(json.dumps(ask_daemon(os.environ['DYNVM_CONDOR_SOCKET'], "
            f"{{'op': {op!r}, 'global_id': {gid!r}}}, 90)))\n"
            "except Exception as e:\n"
            "    print(json.dumps({'refused': type(e).__name__, 'message': str(e)}))\n")
    return {"name": name, "argv": ["/usr/bin/python3", "-c", code]}


def answer(result: dict[str, Any], step: str = "probe") -> dict[str, Any]:
    out: dict[str, Any] = json.loads(result["steps"][step]["stdout"])
    return out


def test_the_starters_slot_comes_from_its_command_line() -> None:
    assert slot_from_argv(["condor_starter", "-f", "-a", "slot1", "<1.2.3.4:9618?x=y>"]) == "slot1"
    real = ["condor_starter", "-f", "-local-name", "slot_type_1", "-a2", "D_FULLDEBUG", "-a", "slot1_4",
            "<h>"]
    assert slot_from_argv(real) == "slot1_4"
    assert slot_from_argv(["condor_starter", "-f", "-a", "12.0", "-slot-name", "slot2_1", "<h>"]) == "slot2_1"
    for bad in (["condor_starter", "-f", "-a", "12.0", "<h>"], ["condor_starter", "-f", "<h>"],
                ["condor_starter", "-a", "slot1;rm", "<h>"]):
        with pytest.raises(IdentityError, match="no slot name"):
            slot_from_argv(bad)


def test_a_job_gets_its_own_vos_vm_through_the_shipped_hooks(node: Node, test_farm: Farm,
                                                              pool_accounts: object) -> None:
    """cms001's job, whose ad claims atlas every way a user can, gets a cms VM on its node; the wrapper
    reads its own VM record with its own credential (the test driver has no exec channel: the run goes
    back to idle through _CONDOR_WRAPPER_ERROR_FILE); JOB_EXIT releases the VM."""
    rt = test_farm.rt
    res = starter(node, "cms001", "slot1_1", ADS[CMS], [
        hook(node.libexec, "condor-prepare-job"),
        hook(node.libexec, "condor-job-wrapper", "{scratch}/job.sh", "first", "two words"),
    ], files={"job.sh": JOB})
    prep = res["steps"]["prepare"]
    assert prep["rc"] == 0, prep
    lines = dict(line.split(" = ", 1) for line in prep["stdout"].splitlines())
    iid = json.loads(lines["DynvmVM"])
    inst = rt.store.require_instance(iid)
    assert inst.vo == "cms" and inst.state is InstanceState.READY and inst.host == node.node
    assert json.loads(lines["DynvmVMHost"]) == node.node
    assert inst.owner == "htcondor:ce01.example.org:21.0.1764539990"
    job = res["steps"]["job"]
    # The wrapper got its own job's credential, read its own record and took the run token; the test
    # driver's VM has no exec channel, a transient failure: HTCondor would rerun the job.
    assert job["rc"] == 1 and "Traceback" not in job["stderr"], job
    assert f"/run/{iid}/exec-{node.node}.sock" in job["wrapper_error"]
    assert rt.store.r.exists(f"dynvm:run:{iid}:1")  # NumShadowStarts = 1 is the attempt
    res = starter(node, "cms001", "slot1_1", ADS[CMS], [hook(node.libexec, "condor-job-exit", "exit")])
    assert res["steps"]["exit"]["rc"] == 0 and res["steps"]["exit"]["stderr"] == ""
    assert rt.store.require_instance(iid).state in (InstanceState.STOPPING, InstanceState.GONE)
    assert not rt.store.r.exists(jobvm_key("dynvm", "job:ce01.example.org:21.0.1764539990:1"))


def test_the_job_credential_reaches_only_its_own_vm(node: Node, test_farm: Farm, hook_url: str,
                                                    pool_accounts: object) -> None:
    cms = answer(starter(node, "cms001", "slot1_1", ADS[CMS], [probe(CMS)]))
    atlas = answer(starter(node, "atlas001", "slot1_2", ADS[ATLAS], [probe(ATLAS)]))
    assert cms["vo"] == "cms" and atlas["vo"] == "atlas", (cms, atlas)
    cms_key, atlas_key = "job:ce01.example.org:21.0.1764539990:1", "job:ce01.example.org:22.0.1764539990:1"
    user, password = cms["cred"].rsplit(":", 1)
    with LightRedis(user_url(hook_url, user, password)) as r:
        assert r.hgetall(jobvm_key("dynvm", cms_key))["instance"] == cms["instance"]
        with pytest.raises(RedisReplyError, match="NOPERM"):
            r.hgetall(jobvm_key("dynvm", atlas_key))
        with pytest.raises(RedisReplyError, match="NOPERM"):
            r.set(f"dynvm:run:{atlas['instance']}:1", "x", nx=True)
        with pytest.raises(RedisReplyError, match="NOPERM"):
            r.lpush("dynvm:hooks", "{}")
    for gid in (CMS, ATLAS):
        user = "cms001" if gid == CMS else "atlas001"
        slot = "slot1_1" if gid == CMS else "slot1_2"
        assert answer(starter(node, user, slot, ADS[gid], [probe(gid, "exit")]))["released"] is True


def test_a_vm_lost_between_prepare_and_wrapper_is_not_silently_replaced(node: Node, test_farm: Farm,
                                                                         pool_accounts: object) -> None:
    from provisioner.control.client import release

    rt = test_farm.rt
    res = starter(node, "cms001", "slot1_1", ADS[CMS], [hook(node.libexec, "condor-prepare-job")])
    first = json.loads(res["steps"]["prepare"]["stdout"].split("DynvmVM = ", 1)[1].splitlines()[0])
    release(rt, first)  # lost under the job (here: released behind its back)
    wait_for(lambda: rt.store.require_instance(first).state is InstanceState.GONE, 60, "first VM gone")
    res = starter(node, "cms001", "slot1_1", ADS[CMS], [
        hook(node.libexec, "condor-job-wrapper", "{scratch}/job.sh"), probe(CMS, "exit", name="exit")],
        files={"job.sh": JOB})
    job = res["steps"]["job"]
    assert job["rc"] == 1 and f"its VM {first} is gone" in job["wrapper_error"], job
    assert answer(res, "exit")["released"] is True  # JOB_EXIT releases whatever VM the attempt has now
    live = [i for i in rt.store.list_instances() if i.owner == "htcondor:ce01.example.org:21.0.1764539990"
            and i.state not in (InstanceState.STOPPING, InstanceState.GONE)]
    assert live == []


def test_a_process_of_the_same_uid_outside_that_jobs_starter_is_refused(node: Node,
                                                                        pool_accounts: object) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "DYNVM_CONDOR_SOCKET": node.socket}
    spec = probe(CMS)
    out = subprocess.run(["setpriv", "--reuid=cms001", "--regid=cms", "--init-groups", "--", *spec["argv"]],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    got = json.loads(out)
    assert got["refused"] == "IdentityError" and "does not run under an HTCondor starter" in got["message"]
    # Under a starter, but another job's (slot1_3 runs no job of cms001's): the schedd says job 21 runs
    # in slot1_1, so the caller is not its job.
    got = answer(starter(node, "cms001", "slot1_3", ADS[CMS], [probe(CMS)]))
    assert got["refused"] == "IdentityError"
    assert "runs in 'slot1_1@wn01.example.org' per the schedd, not in the caller's starter" in got["message"]
    # A user's own process named condor_starter, with a starter's arguments, is not a starter (not root).
    fake = ("import ctypes, subprocess, sys\nctypes.CDLL(None).prctl(15, b'condor_starter', 0, 0, 0)\n"
            "assert open('/proc/self/comm').read().strip() == 'condor_starter'\n"
            "sys.exit(subprocess.run(sys.argv[3:]).returncode)\n")
    as_cms = ["setpriv", "--reuid=cms001", "--regid=cms", "--init-groups", "--"]
    out = subprocess.run([*as_cms, "/usr/bin/python3", "-c", fake, "-a", "slot1_1", *spec["argv"]],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    got = json.loads(out)
    assert got["refused"] == "IdentityError" and "does not run under an HTCondor starter" in got["message"]


def test_a_job_of_another_vo_cannot_be_claimed(node: Node, test_farm: Farm, pool_accounts: object) -> None:
    """cms001, even from inside the atlas job's slot, cannot get the atlas job's (or any atlas) VM."""
    before = {i.id for i in test_farm.rt.store.list_instances()}
    got = answer(starter(node, "cms001", "slot1_2", ADS[ATLAS], [probe(ATLAS)]))
    assert got["refused"] == "IdentityError"
    assert "belongs to 'atlas001' per the schedd, not to the caller 'cms001'" in got["message"]
    assert {i.id for i in test_farm.rt.store.list_instances()} == before


def test_permanent_failure_holds_with_the_reason(node: Node, pool_accounts: object) -> None:
    """alice001's group maps to no VO (its ad's atlas claims do not count): PREPARE_JOB answers
    HookStatusCode 190 (hold) with dynvm's reason as the hold reason."""
    res = starter(node, "alice001", "slot1_3", ADS[ALICE], [
        hook(node.libexec, "condor-prepare-job"),
        hook(node.libexec, "condor-job-wrapper", "{scratch}/job.sh")], files={"job.sh": JOB})
    prep = res["steps"]["prepare"]
    assert prep["rc"] == 1 and "job" not in res["steps"]  # the starter aborts the job
    status = classad2.parseOne(prep["stdout"])
    assert status["HookStatusCode"] == 190
    assert status["HookStatusMessage"].startswith("dynvm: ") and "alice" in status["HookStatusMessage"]


def test_no_pool_is_transient_and_bounded(node: Node, hook_url: str, pool_accounts: object) -> None:
    """The real htcondor2 lookup with no pool here: a clear error at once, HookStatusCode 300 (idle)."""
    sock = str(node.base / "run" / "nopool.sock")
    libexec = install_hooks(node.base / "libexec-nopool", sock, hook_url)
    settings = DaemonSettings(sock, STARTD, {"DYNVM_HOOK_REDIS": hook_url})
    thread, stop = CondorNodeDaemon(settings, Htcondor2Schedd(timeout_s=20)).start_thread()
    try:
        t = time.monotonic()
        res = starter(node, "cms001", "slot1_1", ADS[CMS], [hook(libexec, "condor-prepare-job")])
        took = time.monotonic() - t
    finally:
        stop.set()
        thread.join(10)
    prep = res["steps"]["prepare"]
    status = classad2.parseOne(prep["stdout"])
    assert status["HookStatusCode"] == 300, prep
    assert "cannot ask schedd 'ce01.example.org'" in status["HookStatusMessage"]
    assert took < 30


def test_hostile_requests_get_one_line_and_the_daemon_lives_on(node: Node, pool_accounts: object) -> None:
    import socket

    for raw in (b"not json\n", b'{"op": "rm -rf", "global_id": "x"}\n', b"[]\n", b"x" * 20000,
                b'{"op": "credential", "global_id": "a#1.0#1; rm -rf /"}\n'):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(node.socket)
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(s.makefile("rb").readline())
        assert reply["error"] in ("invalid", "identity") and reply["transient"] is False, reply
    assert node.daemon.status.refused >= 5 and "refused" in node.daemon.status.last_error
    # Hostile job ads on a hook's stdin are refused before anything is sent.
    for name in ("hostile-globalid.ad", "junk.ad"):
        res = starter(node, "cms001", "slot1_1", name, [hook(node.libexec, "condor-prepare-job")])
        prep = res["steps"]["prepare"]
        assert prep["rc"] == 1 and "Traceback" not in prep["stderr"]
        assert classad2.parseOne(prep["stdout"])["HookStatusCode"] == 190


def test_the_shipped_daemon_command(node: Node, hook_url: str) -> None:
    """`dynvm hook condor-daemon` as the systemd unit starts it: bad settings are one line, exit 2; a
    running one refuses a caller outside any starter without asking the schedd."""
    dynvm = [str(Path(sys.executable).parent / "dynvm")]
    env = {k: v for k, v in os.environ.items() if k != "DYNVM_HOOK_REDIS"}
    bad = subprocess.run([*dynvm, "hook", "condor-daemon", "--socket", "relative"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    unit = (DEPLOY / "dynvm-condor-daemon.service").read_text()
    assert "ExecStart=/opt/dynvm/.venv/bin/dynvm hook condor-daemon --socket /run/dynvm/condor.sock" in unit
    sock = str(node.base / "run" / "cli.sock")
    proc = subprocess.Popen([*dynvm, "hook", "condor-daemon", "--socket", sock, "--startd-name", STARTD],
                            env={**env, "DYNVM_HOOK_REDIS": hook_url}, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 60, "the daemon's socket")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        from batch_hooks.htcondor import ask_daemon
        from provisioner.errors import IdentityError as Refused

        with pytest.raises(Refused, match="does not run under an HTCondor starter"):
            ask_daemon(sock, {"op": "credential", "global_id": CMS}, 30)
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0
