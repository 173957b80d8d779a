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


def _in_ns(pid: str, kind: str, inode: int) -> bool:
    if ns_inode(f"/proc/{pid}/ns/{kind}") == inode:
        return True
    # An exiting process's main thread drops its namespaces first; its other threads (a SIGKILLed QEMU's
    # vCPU and I/O threads freeing guest memory) are still in there: ask each of them.
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(ns_inode(f"/proc/{pid}/task/{t}/ns/{kind}") == inode for t in tids if t != pid)


def pids_in_ns(kind: str, inode: int) -> list[int]:
    """Every process (not thread) with a thread in the ``kind`` namespace ('net', 'mnt') of this inode;
    never ourselves."""
    me = os.getpid()
    out: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if _in_ns(entry.name, kind, inode):
            out.append(int(entry.name))
    return out


def kill_ns(kind: str, inode: int, timeout_s: float = 10.0) -> int:
    """SIGKILL every process in the namespace until none is left (every thread has exited: a QEMU guest
    is gone, not only its main thread); returns how many processes were killed.

    Repeats because a dying libvirtd may still fork; each round only kills pids seen in that namespace.
    """
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        pids = pids_in_ns(kind, inode)
        if not pids:
            return len(killed)
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"namespace {kind}:[{inode}] still has pids {pids} after {timeout_s}s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def task_states(pid: int) -> list[str]:
    """The scheduler state letter of every thread of process ``pid`` ([] when there is no such process)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    states: list[str] = []
    for tid in tids:
        try:
            states.append(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(") ", 1)[1][:1])
        except (OSError, IndexError):
            continue  # that thread is gone
    return states


def pid_alive(pid: int | None) -> bool:
    """True while any thread of ``pid`` has not exited.

    A zombie is not alive (it holds nothing and answers nothing), but a process whose main thread has
    exited while other threads still tear down (a SIGKILLed QEMU freeing guest memory) is: its leader
    looks like a zombie for up to a second while the guest still exists.
    """
    if not pid or pid <= 0:
        return False
    return any(s not in "ZX" for s in task_states(pid))


def boot_id() -> str:
    """This boot's random id: a pid and start time recorded before a reboot mean nothing after it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def identity(pid: int) -> str | None:
    """``boot_id:start_ticks`` of a running process: with the pid, unique for the machine's lifetime."""
    start = start_ticks(pid)
    return None if start is None else f"{boot_id()}:{start}"


def is_ours(pid: int | None, recorded: str | None) -> bool:
    """``pid`` still runs and is the process whose identity() was recorded (not a reused pid)."""
    if not pid or not recorded or not pid_alive(pid):
        return False
    return identity(pid) == recorded


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


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (children first), read from /proc's parent pids."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out
