"""Process and namespace helpers of the QEMU farm (Linux /proc; subprocess is the only other seam)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from provisioner.errors import DeadlineExceeded, UnavailableError


def ns_inode(path: str | os.PathLike[str]) -> int | None:
    """The inode of a namespace file (/proc/PID/ns/net, /run/netns/NAME), None when it is gone."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_ns(kind: str, inode: int) -> list[int]:
    """Every process (not thread) whose ``kind`` namespace ('net', 'mnt') has this inode; never ourselves."""
    me = os.getpid()
    out: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if ns_inode(f"/proc/{entry.name}/ns/{kind}") == inode:
            out.append(int(entry.name))
    return out


def kill_ns(kind: str, inode: int, timeout_s: float = 10.0) -> int:
    """SIGKILL every process in the namespace until none is left; returns how many were killed.

    Repeats because a dying libvirtd may still fork; each round only kills pids seen in that namespace.
    """
    killed = 0
    deadline = time.monotonic() + timeout_s
    while True:
        pids = pids_in_ns(kind, inode)
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"namespace {kind}:[{inode}] still has pids {pids} after {timeout_s}s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive: it holds nothing and answers nothing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def run(argv: list[str], what: str, timeout_s: float = 30.0) -> str:
    """Run a command; UnavailableError naming ``what`` and the command's stderr if it fails."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"{what}: {argv[0]} did not finish in {timeout_s}s") from None
    except FileNotFoundError:
        raise UnavailableError(f"{what}: {argv[0]} is not installed") from None
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().replace("\n", " | ")[:300]
        raise UnavailableError(f"{what}: `{' '.join(argv)}` failed ({p.returncode}): {err}")
    return p.stdout


def wait_for(cond_path: Path, what: str, timeout_s: float, alive: int | None = None) -> None:
    """Wait until ``cond_path`` exists; fail early if process ``alive`` died meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not cond_path.exists():
        if alive is not None and not pid_alive(alive):
            raise UnavailableError(f"{what}: process {alive} exited before {cond_path} appeared")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{what}: {cond_path} did not appear within {timeout_s}s")
        time.sleep(0.01)
