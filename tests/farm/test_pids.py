"""farm.json's pids are trusted only when they are provably the farm's processes (reboot, pid reuse)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.farm.layout import FarmLayout, FarmState
from provisioner.farm.local import farm_down, farm_status
from provisioner.farm.qemu.procs import ns_inode, pid_alive, pids_in_ns
from provisioner.state.store import StateStore
from tests.conftest import wait_until
from tests.farm.conftest import up


@pytest.fixture()
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process whose pid a stale farm.json names."""
    p = subprocess.Popen(["sleep", "300"])
    yield p
    p.kill()
    p.wait()


def _stale(layout: FarmLayout, pid: int) -> None:
    """A farm.json naming ``pid`` with nothing that proves it is the farm's (as after a reboot)."""
    layout.base.mkdir(parents=True, exist_ok=True)
    stale = {
        "driver": "test", "hosts": ["hv1"], "redis_url": "redis://127.0.0.1:1/0", "redis_pid": pid,
        "supervisor_pid": pid, "children": {"worker": pid, "agent-hv1": pid},
    }
    layout.state_file.write_text(json.dumps(stale))


def test_stale_pids_are_not_signalled(layout: FarmLayout, bystander: subprocess.Popen[bytes]) -> None:
    _stale(layout, bystander.pid)
    assert farm_status(layout)["up"] is False
    assert farm_down(layout) is False
    assert bystander.poll() is None  # still running: nothing was sent to it


def test_farm_up_over_stale_pids_starts_a_farm(
    layout: FarmLayout, bystander: subprocess.Popen[bytes]
) -> None:
    _stale(layout, bystander.pid)
    up(layout)
    st = layout.read_state()
    assert st is not None and st.supervisor_pid != bystander.pid and st.supervisor_up()
    assert StateStore.from_url(st.redis_url).lease_alive("hv1")
    assert bystander.poll() is None


def test_identity_tells_a_reused_pid_apart() -> None:
    from provisioner.farm.qemu.procs import identity

    p = subprocess.Popen(["sleep", "300"])
    try:
        ident = identity(p.pid)
        assert ident is not None and FarmState("test", [], "", idents={"x": ident}).ours("x", p.pid)
        assert not FarmState("test", [], "", idents={"x": ident + "1"}).ours("x", p.pid)
        assert not FarmState("test", [], "").ours("x", p.pid)  # nothing recorded: not trusted
    finally:
        p.kill()
        p.wait()


HALF_DEAD = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(300,)).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)  # the main thread ends; the process lives on in its other thread
"""


def test_a_process_whose_main_thread_exited_is_still_alive_and_in_its_namespace() -> None:
    # A SIGKILLed QEMU looks like this for up to a second: leader a zombie, threads still tearing down.
    p = subprocess.Popen([sys.executable, "-c", HALF_DEAD], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        wait_until(
            lambda: Path(f"/proc/{p.pid}/stat").read_text().rsplit(") ", 1)[1][0] == "Z",
            what="the main thread to exit",
        )
        assert pid_alive(p.pid)
        net = ns_inode("/proc/self/ns/net")
        assert net is not None and p.pid in pids_in_ns("net", net)
    finally:
        p.kill()
        p.wait()
    assert not pid_alive(p.pid)



