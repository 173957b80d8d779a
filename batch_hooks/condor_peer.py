"""Who is on the other end of the node daemon's socket: the kernel's answer, never the caller's.

A caller on an HTCondor execute node (a starter hook or the USER_JOB_WRAPPER, both run with the job's
privileges) is identified by what it cannot choose:

* its uid, gid and pid from ``SO_PEERCRED`` (filled in by the kernel at ``connect()``);
* its process ancestry (``/proc/PID/stat`` ppid chain): the nearest ancestor that is a ``condor_starter``
  running as root is the starter of the job the caller belongs to.  A user may rename its own process
  (``prctl(PR_SET_NAME)``) but cannot give it uid 0 or re-parent itself under another starter;
* that starter's slot, from its command line.  The startd starts every starter as
  ``condor_starter -f [-local-name slot_type_N] [-a2 ...] -a <slot> [-slot-name <slot>] <shadow>``
  (src/condor_startd.V6/Starter.cpp, ``execDCStarter``: ``-a`` is the slot unless STARTER_LOG_NAME_APPEND
  says otherwise, in which case ``-slot-name`` carries it).  A root process's argv is not the user's to
  write.

The daemon then asks the schedd whether the job the caller names runs in exactly that slot of this
startd (``RemoteHost = "<slot>@<startd>"``) and belongs to the caller's user (batch_hooks.condor_daemon).

PID reuse: the peer's process start time must precede the moment the connection was accepted, and a
pidfd taken at once must still show the process alive after the checks: a caller that connected and
exited cannot lend its pid to another process.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import time
from dataclasses import dataclass

from provisioner.errors import IdentityError

STARTER_COMM = "condor_starter"
SLOT_RE = re.compile(r"^slot[0-9]{1,5}(_[0-9]{1,6})?$")
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    start_ticks: int  # clock ticks after boot (CLOCK_BOOTTIME)


@dataclass(frozen=True, slots=True)
class Starter:
    pid: int
    slot: str


def peer_of(conn: socket.socket) -> Peer:
    """The connected process's pid/uid/gid as the kernel recorded them at connect()."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    if pid <= 0:
        raise IdentityError("the caller's process is not visible from here (another pid namespace?)")
    return Peer(pid, uid, gid)


def read_stat(pid: int, proc: str = "/proc") -> ProcStat:
    try:
        with open(f"{proc}/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        raise IdentityError(f"process {pid} is gone") from None
    # comm may hold spaces and parentheses: it ends at the *last* ") ".
    head, _, rest = text.rpartition(") ")
    fields = rest.split()
    pid_text, _, comm = head.partition(" (")
    if not pid_text.isdigit() or len(fields) < 20:
        raise IdentityError(f"process {pid}: unreadable /proc stat")
    return ProcStat(int(pid_text), comm, int(fields[1]), int(fields[19]))


def real_uids(pid: int, proc: str = "/proc") -> tuple[int, int]:
    """(real uid, effective uid) of a process."""
    try:
        with open(f"{proc}/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    parts = line.split()
                    return int(parts[1]), int(parts[2])
    except OSError:
        pass
    raise IdentityError(f"process {pid} is gone")


def cmdline(pid: int, proc: str = "/proc") -> list[str]:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read(64 * 1024)
    except OSError:
        raise IdentityError(f"process {pid} is gone") from None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def slot_from_argv(argv: list[str]) -> str:
    """The slot a starter serves, from its argv (``-slot-name`` wins over ``-a``)."""
    found: dict[str, str] = {}
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-a", "-slot-name") and arg not in found:
            found[arg] = argv[i + 1]
    slot = found.get("-slot-name") or found.get("-a")
    if slot is None or not SLOT_RE.fullmatch(slot):
        shown = repr(slot)[:40] if slot is not None else "none"
        raise IdentityError(f"condor_starter: no slot name in its arguments ({shown}); "
                            "STARTER_LOG_NAME_APPEND must be unset or Slot")
    return slot


def find_starter(pid: int, proc: str = "/proc", starter_exe: str | None = None) -> Starter:
    """The nearest ancestor of ``pid`` that is a root ``condor_starter`` (and, if given, runs
    ``starter_exe``), with its slot.  IdentityError when the process is under no starter."""
    current = read_stat(pid, proc).ppid
    for _ in range(MAX_DEPTH):
        if current <= 1:
            break
        st = read_stat(current, proc)
        if st.comm == STARTER_COMM and real_uids(current, proc) == (0, 0):
            if starter_exe is not None:
                try:
                    exe = os.readlink(f"{proc}/{current}/exe")
                except OSError:
                    exe = ""
                if os.path.realpath(exe) != os.path.realpath(starter_exe):
                    raise IdentityError(f"process {current} is named {STARTER_COMM} but does not run "
                                        f"{starter_exe}")
            return Starter(current, slot_from_argv(cmdline(current, proc)))
        current = st.ppid
    raise IdentityError(f"process {pid} does not run under an HTCondor starter")


def boot_ticks() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


class PeerProcess:
    """Pins the peer process for the duration of the checks (pidfd + start time)."""

    def __init__(self, peer: Peer, accepted_ticks: int, proc: str = "/proc") -> None:
        self.peer = peer
        try:
            self.fd = os.pidfd_open(peer.pid)
        except OSError:
            raise IdentityError(f"process {peer.pid} is gone") from None
        st = read_stat(peer.pid, proc)
        if st.start_ticks > accepted_ticks + 1:
            os.close(self.fd)
            raise IdentityError(f"process {peer.pid} started after it connected (pid reused)")
        if real_uids(peer.pid, proc)[0] != peer.uid:
            os.close(self.fd)
            raise IdentityError(f"process {peer.pid} changed its uid since it connected")

    def still_alive(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not poller.poll(0)  # a pidfd becomes readable when its process exits

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
