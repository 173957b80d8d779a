"""The generic hook (Grid Engine's environment) and the payload wrapper with the job's own ACL user.  The
guest is a hand-written fake on the VM's exec socket path (test driver VMs have none); QEMU: qemu_e2e."""

from __future__ import annotations

import io
import os
import pwd
import subprocess
import sys

import pytest

from batch_hooks.payload import main as payload_main
from batch_hooks.proto import call
from batch_hooks.resp import LightRedis
from provisioner.execchan.client import exec_socket
from tests.batch_hooks.test_exec_direct import Guest
from tests.batch_hooks.test_hooks_server import ctx_for
from tests.control.conftest import Farm

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


def hook_env(hook_url: str, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "DYNVM_HOOK_REDIS": hook_url, "DYNVM_PROLOG_TIMEOUT": "30", **extra}


def run_hook(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batch_hooks", *argv], env=env, capture_output=True,
                          text=True, timeout=60)


def test_generic_prolog_and_epilog_from_grid_engine_environment(farm: Farm, hook_url: str) -> None:
    from batch_hooks.generic import context

    env = hook_env(hook_url, JOB_ID="4711", SGE_TASK_ID="undefined", USER="atlas001", QUEUE="all.q",
                   NSLOTS="1", DYNVM_CLUSTER="sge1")
    ctx = context({}, env, "sge")
    assert (ctx.job_id, ctx.user, ctx.partition, ctx.uid) == ("4711", "atlas001", "all.q",
                                                              pwd.getpwnam("atlas001").pw_uid)
    out = subprocess.run([sys.executable, "-m", "provisioner.cli.main", "hook", "generic", "prolog",
                          "--system", "sge"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    iid = out.stdout.split()[0].removeprefix("DYNVM_VM=")
    assert farm.rt.store.require_instance(iid).vo == "atlas"
    env["USER"] = "alice001"  # no VO: Grid Engine's "job error" code, not a queue error
    bad = subprocess.run([sys.executable, "-m", "provisioner.cli.main", "hook", "generic", "prolog",
                          "--system", "sge"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 100 and "alice001" in bad.stderr and "Traceback" not in bad.stderr


def test_payload_runs_the_script_in_its_own_vm_once(farm: Farm, hook_url: str) -> None:
    with LightRedis(hook_url) as r:
        vm = call(r, "dynvm", "prolog", ctx_for("cms001", "5150"), 60)
    guest = Guest(exec_socket(vm["shared_dir"], vm["instance"], vm["host"]))
    port = farm.rt.store.r.connection_pool.connection_kwargs["port"]
    env = {"DYNVM_JOB_CRED": f"{vm['job_user']}:{vm['job_password']}",
           "DYNVM_JOB_REDIS": f"redis://127.0.0.1:{port}/0"}
    out, err = io.StringIO(), io.StringIO()
    script = "#!/bin/sh\necho in the vm\n"
    code = _main_with_stdin(env, script, out, err)
    assert code == 3 and out.getvalue() == script and err.getvalue() == "e\n"
    assert [r.script for r in guest.requests] == [script]
    again = io.StringIO()
    assert _main_with_stdin(env, script, io.StringIO(), again) == 4  # the same attempt never starts twice
    assert "already started" in again.getvalue() and len(guest.requests) == 1


def _main_with_stdin(env: dict[str, str], script: str, out: io.StringIO, err: io.StringIO) -> int:
    """The wrapper as job_submit.lua runs it: the script hex-encoded on stdin."""
    old = sys.stdin
    sys.stdin = io.StringIO(script.encode().hex())
    try:
        return payload_main(["--hex"], env, out, err)
    finally:
        sys.stdin = old


@pytest.mark.parametrize("cred", ["", "dynvm-job:t:1:0", "dynvm-job:t:1:0:" + "0" * 31, "x:" + "0" * 32,
                                  "dynvm-job:t:1:0:" + "0" * 32 + "\n"])
def test_payload_refuses_a_missing_or_forged_credential(farm: Farm, cred: str) -> None:
    port = farm.rt.store.r.connection_pool.connection_kwargs["port"]
    env = {"DYNVM_JOB_CRED": cred, "DYNVM_JOB_REDIS": f"redis://127.0.0.1:{port}/0"}
    err = io.StringIO()
    code = _main_with_stdin(env, "true\n", io.StringIO(), err)
    text = err.getvalue()
    assert code in (2, 4, 5) and text.startswith("dynvm payload:") and "Traceback" not in text


def test_hook_entry_points_refuse_hostile_environment_without_traceback(hook_url: str) -> None:
    hostile = hook_env(hook_url, SLURM_JOB_ID="1;reboot", SLURM_JOB_USER="cms001", SLURM_JOB_UID="0x10",
                       SLURM_JOB_GID="1", SLURM_CLUSTER_NAME="c")
    res = run_hook("slurm", "prolog-slurmctld", env=hostile)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "SLURM_JOB_UID" in res.stderr
    res = run_hook("slurm", "bogus", env=hostile)
    assert res.returncode == 2 and "usage" in res.stderr
    res = run_hook("payload", env={"DYNVM_JOB_CRED": "a" * 5000})
    assert res.returncode == 2 and "Traceback" not in res.stderr
