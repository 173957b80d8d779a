"""The payload wrapper (python -m batch_hooks payload, as job_submit.lua runs it) streams the job's output
into its output file while the job runs, and a wrapper killed mid-run and started again with the same
DYNVM_PAYLOAD_CURSOR resumes the same run: the file ends up with every byte exactly once, in print order,
and nothing starts twice.  Real Redis and the job's own ACL user; the guest is the real guest runner under
busybox on the VM's exec socket path (tests/execchan/guestsim.py; on QEMU: tests/qemu_e2e/test_stream_*)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch_hooks.proto import call
from batch_hooks.resp import LightRedis
from provisioner.execchan.client import exec_socket
from tests.batch_hooks.slurm_cluster import REPO
from tests.batch_hooks.test_hooks_server import ctx_for
from tests.conftest import wait_until
from tests.control.conftest import Farm
from tests.execchan.guestsim import BUSYBOX, running_guest

pytestmark = [pytest.mark.redis, pytest.mark.libvirt,
              pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox (the test images' shell)")]


def wrapper(env: dict[str, str], script: str, out: Path) -> subprocess.Popen[bytes]:
    """The wrapper as Slurm runs it by default: stdout and stderr on the one output file."""
    with out.open("ab") as f:
        p = subprocess.Popen([sys.executable, "-m", "batch_hooks", "payload", "--hex"], stdin=subprocess.PIPE,
                             stdout=f, stderr=f, env=env, cwd=REPO)
    assert p.stdin is not None
    p.stdin.write(script.encode().hex().encode())
    p.stdin.close()
    return p


def test_a_killed_wrapper_started_again_resumes_its_run_exactly(farm: Farm, hook_url: str,
                                                                tmp_path: Path) -> None:
    with LightRedis(hook_url) as r:
        vm = call(r, "dynvm", "prolog", ctx_for("cms001", "6160"), 60)
    with running_guest(tmp_path, exec_socket(vm["shared_dir"], vm["instance"], vm["host"])):
        port = farm.rt.store.r.connection_pool.connection_kwargs["port"]
        env = {"PATH": os.environ["PATH"], "DYNVM_JOB_CRED": f"{vm['job_user']}:{vm['job_password']}",
               "DYNVM_JOB_REDIS": f"redis://127.0.0.1:{port}/0",
               "DYNVM_PAYLOAD_CURSOR": str(tmp_path / "cur")}
        go, out = tmp_path / "go", tmp_path / "job.out"
        script = (f"echo first; echo warn >&2; while [ ! -e {go} ]; do sleep 0.05; done; "
                  "i=0; while [ $i -lt 3000 ]; do echo line-$i; [ $i = 1500 ] && echo mid >&2; i=$((i+1)); "
                  "done; exit 6")
        first = wrapper(env, script, out)
        try:
            wait_until(lambda: out.read_bytes() == b"first\nwarn\n", 60, what="the first lines")
            assert first.poll() is None  # they arrived while the job runs
        finally:
            first.kill()  # the wrapper dies
            first.wait(30)
        go.touch()
        again = wrapper(env, script, out)
        assert again.wait(120) == 6
        lines = [f"line-{i}\n" + ("mid\n" if i == 1500 else "") for i in range(3000)]
        assert out.read_text() == "first\nwarn\n" + "".join(lines)
        assert not (tmp_path / "cur").exists()  # done: the cursor goes
        third = wrapper(env, script, tmp_path / "third.out")  # a new start of the same attempt
        assert third.wait(60) == 4 and "already started" in (tmp_path / "third.out").read_text()
