"""Payload output streams on real QEMU (TCG) guests, through the guest runner the test images embed:
``dynvm exec`` writes each chunk to its stdout file as the guest prints it (the file grows while the payload
runs), a client killed mid-run is resumed from its cursor file with nothing lost or repeated, more than
2 MiB of binary output arrives byte-exact, stderr and the exit code are kept."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioner.control.client import ENDED, choose_image, release, submit, wait
from provisioner.control.execjob import exec_in_vm
from provisioner.model import Instance, InstanceState
from tests.batch_hooks.slurm_cluster import wait_for
from tests.qemu_e2e.conftest import QFarm

pytestmark = [pytest.mark.qemu, pytest.mark.redis, pytest.mark.libvirt]


def ready_vm(qfarm: QFarm, vo: str) -> Instance:
    img, chosen = choose_image(qfarm.rt, None, vo)
    inst, _ = submit(qfarm.rt, img, chosen)
    vm = wait(qfarm.rt, inst.id, 180)
    assert vm.state is InstanceState.READY, vm.reason
    return vm


def dynvm_exec(qfarm: QFarm, vm: Instance, *args: str) -> list[str]:
    return [sys.executable, "-m", "provisioner.cli.main", "--config", str(qfarm.layout.config_file), "exec",
            vm.id, "--timeout", "0", *args]


def test_output_file_grows_while_the_payload_runs_and_a_killed_client_resumes(qfarm: QFarm,
                                                                              tmp_path: Path) -> None:
    vm = ready_vm(qfarm, "cms")
    out, err, cursor = tmp_path / "out", tmp_path / "err", tmp_path / "cursor"
    script = ("echo first; echo warn >&2; while [ ! -e /tmp/go ]; do sleep 0.1; done; "
              "head -c 2500000 /dev/urandom > /tmp/blob; cat /tmp/blob; md5sum < /tmp/blob >&2; "
              "printf 'last\\n\\377\\000'; exit 3")
    with out.open("wb") as o, err.open("wb") as e:
        argv = [*dynvm_exec(qfarm, vm, "--cursor-file", str(cursor)), "--", "sh", "-c", script]
        first = subprocess.Popen(argv, stdout=o, stderr=e)
    try:
        # The payload waits for /tmp/go, which only the test creates: the line is there before its end.
        wait_for(lambda: out.read_bytes() == b"first\n" and err.read_bytes() == b"warn\n", 120, "first lines")
        assert first.poll() is None
        wait_for(lambda: cursor.read_text().strip().endswith(":1:1"), 60, "the cursor after both chunks")
    finally:
        first.kill()  # the client dies while the payload runs
        first.wait(30)
    # A second exec on the same channel while the payload still runs (one-shot protocol) lets it go on.
    assert exec_in_vm(qfarm.rt, vm.id, ["touch", "/tmp/go"], 60)["exit_code"] == 0
    with out.open("ab") as o, err.open("ab") as e:
        argv = dynvm_exec(qfarm, vm, "--cursor-file", str(cursor))  # no command: resume from the file
        again = subprocess.run(argv, stdout=o, stderr=e, timeout=600)
    assert again.returncode == 3
    data = out.read_bytes()
    assert data[:6] == b"first\n" and data[-7:] == b"last\n\xff\x00" and len(data) == 6 + 2500000 + 7
    digest = hashlib.md5(data[6:-7]).hexdigest()
    assert err.read_bytes() == f"warn\n{digest}  -\n".encode()
    release(qfarm.rt, vm.id)
    assert wait(qfarm.rt, vm.id, 60, until=ENDED).state is InstanceState.GONE


def test_streamed_exec_keeps_stderr_exit_code_and_big_binary_output(qfarm: QFarm) -> None:
    vm = ready_vm(qfarm, "atlas")
    got: dict[str, bytearray] = {"o": bytearray(), "e": bytearray()}
    arrivals: list[float] = []

    def out(data: bytes) -> None:
        got["o"].extend(data)
        arrivals.append(time.monotonic())

    script = ("head -c 3145728 /dev/urandom > /tmp/big; cat /tmp/big; md5sum < /tmp/big >&2; "
              "cat /etc/vo >&2; exit 17")
    res = exec_in_vm(qfarm.rt, vm.id, ["sh", "-c", script], None, out=out, err=got["e"].extend)
    assert res["exit_code"] == 17 and res["out_bytes"] == len(got["o"]) == 3145728
    assert got["e"] == f"{hashlib.md5(got['o']).hexdigest()}  -\natlas\n".encode()
    assert len(arrivals) >= 3 * 1024 * 1024 // 65536  # in chunks, not one reply at the end
    # The one-shot protocol (probes, --json) still answers, and the run left nothing behind in the guest.
    left = exec_in_vm(qfarm.rt, vm.id, ["sh", "-c", "ls -a /tmp/.dynvm-run 2>/dev/null | wc -l"], 60)
    assert left["stdout"].strip() == "0", left
    release(qfarm.rt, vm.id)
    assert wait(qfarm.rt, vm.id, 60, until=ENDED).state is InstanceState.GONE
