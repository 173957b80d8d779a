"""The HTCondor path on real QEMU guests: a job's unmodified script, run by deploy/htcondor's
USER_JOB_WRAPPER under a (stand-in) condor_starter as a pool account, runs inside its VO's VM, prints the
guest's /etc/vo with its own arguments and exits with the script's exit code; JOB_EXIT releases the VM.

No HTCondor daemon runs here (see deploy/htcondor/README.md): the starter is tests/data/htcondor's
stand-in, the schedd's copy comes from the canned ads, the node daemon is the real one on its socket."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_hooks.condor_daemon import CondorNodeDaemon, DaemonSettings
from provisioner.model import InstanceState
from tests.batch_hooks.conftest import trusted_hook_user
from tests.batch_hooks.slurm_cluster import ensure_pool_accounts, wait_for
from tests.batch_hooks.test_condor_daemon import (
    ADS,
    ATLAS,
    CMS,
    STARTD,
    CannedSchedd,
    Node,
    hook,
    install_hooks,
    starter,
)
from tests.qemu_e2e.conftest import QFarm

pytestmark = [pytest.mark.qemu, pytest.mark.redis, pytest.mark.libvirt]
JOB = "#!/bin/sh\necho \"vo=$(cat /etc/vo) args=$1|$2\"\necho to-stderr >&2\nexit 7\n"


@pytest.fixture(scope="module")
def qnode(qfarm: QFarm) -> Iterator[Node]:
    ensure_pool_accounts()
    with trusted_hook_user(qfarm.rt.store.r) as hook_url:
        base = Path(tempfile.mkdtemp(prefix="h4-condor-q-"))
        base.chmod(0o755)
        (base / "execute").mkdir(mode=0o755)
        sock = str(base / "run" / "condor.sock")
        libexec = install_hooks(base / "libexec", sock, hook_url)
        hv = sorted(h.name for h in qfarm.rt.store.list_hosts())[0]
        settings = DaemonSettings(sock, STARTD, {"DYNVM_HOOK_REDIS": hook_url, "DYNVM_PREFIX": "dynvm",
                                                 "DYNVM_PROLOG_TIMEOUT": "240"}, node=hv)
        schedd = CannedSchedd()
        daemon = CondorNodeDaemon(settings, schedd)
        thread, stop = daemon.start_thread()
        yield Node(base, sock, libexec, schedd, daemon, hv)
        stop.set()
        thread.join(10)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("gid, user, slot, vo", [(CMS, "cms001", "slot1_1", "cms"),
                                                 (ATLAS, "atlas001", "slot1_2", "atlas")])
def test_unmodified_executable_runs_inside_its_vos_vm(qnode: Node, qfarm: QFarm, gid: str, user: str,
                                                      slot: str, vo: str) -> None:
    res = starter(qnode, user, slot, ADS[gid], [
        hook(qnode.libexec, "condor-prepare-job"),
        hook(qnode.libexec, "condor-job-wrapper", "{scratch}/job.sh", "first", "two words"),
        hook(qnode.libexec, "condor-job-exit", "exit"),
    ], files={"job.sh": JOB})
    prep, job = res["steps"]["prepare"], res["steps"]["job"]
    assert prep["rc"] == 0, prep
    assert job["wrapper_error"] is None, job
    assert job["stdout"] == f"vo={vo} args=first|two words\n" and job["stderr"] == "to-stderr\n", job
    assert job["rc"] == 7
    assert res["steps"]["exit"]["rc"] == 0
    owner = f"htcondor:ce01.example.org:{gid.split('#')[1]}.{gid.split('#')[2]}"
    owned = [i for i in qfarm.rt.store.list_instances(ended=True) if i.owner == owner]
    assert len(owned) == 1 and owned[0].vo == vo and owned[0].host == qnode.node
    iid = owned[0].id
    wait_for(lambda: qfarm.rt.store.require_instance(iid).state is InstanceState.GONE, 120, "released")


def test_a_job_cannot_exec_into_another_jobs_vm(qnode: Node, qfarm: QFarm) -> None:
    """Both VMs up: cms001 reaches its own VM's exec channel and is refused at the atlas VM's (the
    channel belongs to the atlas job's uid, mode 0600) and at its run token (its Redis credential)."""
    import json
    import subprocess

    from tests.batch_hooks.slurm_cluster import REPO
    from tests.batch_hooks.test_condor_daemon import answer, probe

    cms = starter(qnode, "cms001", "slot1_1", ADS[CMS], [hook(qnode.libexec, "condor-prepare-job"),
                                                         probe(CMS)])
    atlas = starter(qnode, "atlas001", "slot1_2", ADS[ATLAS], [hook(qnode.libexec, "condor-prepare-job")])
    assert cms["steps"]["prepare"]["rc"] == 0 and atlas["steps"]["prepare"]["rc"] == 0, (cms, atlas)
    mine = answer(cms)
    theirs = json.loads(atlas["steps"]["prepare"]["stdout"].split("DynvmVM = ", 1)[1].splitlines()[0])
    shared = qfarm.rt.config.storage.shared_dir
    code = ("import json, sys\nfrom provisioner.execchan.client import exec_socket, run_in_guest\n"
            "for iid in sys.argv[1:]:\n"
            f"    path = exec_socket({str(shared)!r}, iid, {qnode.node!r})\n"
            "    try:\n        print(json.dumps(run_in_guest(path, ['cat', '/etc/vo'], timeout=60).stdout))\n"
            "    except Exception as e:\n        print(json.dumps(type(e).__name__ + ': ' + str(e)))\n")
    as_cms = ["setpriv", "--reuid=cms001", "--regid=cms", "--init-groups", "--"]
    out = subprocess.run([*as_cms, "/usr/bin/python3", "-c", code, mine["instance"], theirs],
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"}, capture_output=True, text=True,
                         timeout=180, check=True).stdout.splitlines()
    own, other = (json.loads(line) for line in out)
    assert own == "cms\n", own
    assert "Permission denied" in other and "atlas" not in other, other
    for user, slot, gid in (("cms001", "slot1_1", CMS), ("atlas001", "slot1_2", ATLAS)):
        assert answer(starter(qnode, user, slot, ADS[gid], [probe(gid, "exit")]))["released"] is True
