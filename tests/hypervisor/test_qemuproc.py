"""Self-fencing's fast kill: a guest's QEMU process found by ``-name guest=NAME`` and SIGKILLed, no other."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.hypervisor.qemuproc import kill_guests, names_guest, qemu_pids
from tests.conftest import wait_until


@pytest.mark.parametrize(
    ("argv", "name", "match"),
    [
        (["/usr/bin/qemu-system-x86_64", "-name", "guest=dynvm-ab12,debug-threads=on"], "dynvm-ab12", True),
        (["qemu-system-x86_64", "-S", "-name", "guest=dynvm-ab12"], "dynvm-ab12", True),
        (["/usr/bin/qemu-system-x86_64", "-name", "guest=dynvm-ab123,debug-threads=on"], "dynvm-ab12", False),
        (["/usr/bin/qemu-system-x86_64", "-name", "guest=dynvm-ab1,debug-threads=on"], "dynvm-ab12", False),
        (["/usr/bin/python3", "-name", "guest=dynvm-ab12,debug-threads=on"], "dynvm-ab12", False),
        (["/usr/bin/qemu-system-x86_64", "-uuid", "guest=dynvm-ab12"], "dynvm-ab12", False),
        ([], "dynvm-ab12", False),
    ],
)
def test_names_guest(argv: list[str], name: str, match: bool) -> None:
    assert names_guest(argv, name) is match


@pytest.fixture()
def fake_qemus(tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Processes whose executable is called qemu-system-x86_64 and whose command lines name guests."""
    exe = tmp_path / "qemu-system-x86_64"
    exe.symlink_to(sys.executable)
    sleeper = "import time; time.sleep(120)"
    procs = {
        name: subprocess.Popen([str(exe), "-c", sleeper, "-name", f"guest={name},debug-threads=on"])
        for name in ("dynvm-fence1", "dynvm-fence10", "dynvm-other")
    }
    yield procs
    for p in procs.values():
        p.kill()
        p.wait()


def test_kill_guests_kills_exactly_the_named_ones(fake_qemus: dict[str, subprocess.Popen[bytes]]) -> None:
    pids = {p.pid: n for n, p in fake_qemus.items()}
    wait_until(lambda: set(qemu_pids(set(fake_qemus))) == set(pids), 10, what="the fake QEMUs' cmdlines")
    assert qemu_pids({"dynvm-fence1"}) == {fake_qemus["dynvm-fence1"].pid: "dynvm-fence1"}
    assert kill_guests({"dynvm-fence1", "dynvm-gone"}) == ["dynvm-fence1"]
    assert fake_qemus["dynvm-fence1"].wait(timeout=10) == -9
    assert fake_qemus["dynvm-fence10"].poll() is None and fake_qemus["dynvm-other"].poll() is None
    assert kill_guests(set()) == [] and os.getpid() not in qemu_pids({"dynvm-fence1"})
