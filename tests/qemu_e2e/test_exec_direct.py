"""A payload on real QEMU goes straight to the guest's exec channel (no agent task): its output and exit
code come back, it has no time limit, and a replayed start of the same attempt is refused."""

from __future__ import annotations

import pytest

from provisioner.control.client import ENDED, choose_image, release, submit, wait
from provisioner.control.execjob import exec_in_vm
from provisioner.errors import ConflictError
from provisioner.model import InstanceState
from tests.qemu_e2e.conftest import QFarm

pytestmark = [pytest.mark.qemu, pytest.mark.redis, pytest.mark.libvirt]


def test_payload_runs_once_per_attempt_straight_through_the_channel(qfarm: QFarm) -> None:
    img, vo = choose_image(qfarm.rt, None, "lhcb")
    inst, _ = submit(qfarm.rt, img, vo, owner="slurm:4242")
    vm = wait(qfarm.rt, inst.id, 180)
    assert vm.state is InstanceState.READY, vm.reason
    script = ["sh", "-c", "cat /etc/vo; sleep 2; echo done >&2; exit 9"]
    res = exec_in_vm(qfarm.rt, vm.id, script, timeout_s=None, run_token="0")
    assert (res["exit_code"], res["stdout"], res["stderr"]) == (9, "lhcb\n", "done\n")
    assert res["duration_s"] >= 2
    with pytest.raises(ConflictError, match="already started"):
        exec_in_vm(qfarm.rt, vm.id, ["sh", "-c", "echo second > /tmp/second"], None, run_token="0")
    assert exec_in_vm(qfarm.rt, vm.id, ["sh", "-c", "ls /tmp/second || echo none"], 30)["stdout"] == "none\n"
    release(qfarm.rt, vm.id)
    assert wait(qfarm.rt, vm.id, 60, until=ENDED).state is InstanceState.GONE


def test_dynvm_exec_cli_no_limit_and_once(qfarm: QFarm) -> None:
    import subprocess
    import sys

    img, vo = choose_image(qfarm.rt, None, "cms")
    inst, _ = submit(qfarm.rt, img, vo)
    vm = wait(qfarm.rt, inst.id, 180)
    assert vm.state is InstanceState.READY, vm.reason
    base = [sys.executable, "-m", "provisioner.cli.main", "--config", str(qfarm.layout.config_file), "exec",
            vm.id, "--timeout", "0", "--once", "job-1", "--"]
    first = subprocess.run([*base, "sh", "-c", "cat /etc/vo; exit 7"], capture_output=True, text=True,
                           timeout=120)
    assert (first.returncode, first.stdout) == (7, "cms\n"), first.stderr
    again = subprocess.run([*base, "true"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 4 and "already started" in again.stderr and again.stderr.count("\n") == 1
    release(qfarm.rt, vm.id)
    assert wait(qfarm.rt, vm.id, 60, until=ENDED).state is InstanceState.GONE
