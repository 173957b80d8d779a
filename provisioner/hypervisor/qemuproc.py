"""Find and SIGKILL a libvirt QEMU guest's process directly, by the domain name on its command line.

Self-fencing must end a guest *now*: ``virDomainDestroy`` through libvirtd first sends SIGTERM, waits for
the process, then cleans up — seconds for a TCG guest on a loaded host, while the monitor's clock (lease
end + safety margin) keeps running.  libvirt starts every QEMU guest with ``-name guest=NAME,...``; a
process whose executable is a ``qemu-system-*`` and whose command line names exactly that guest is that
domain's QEMU (domain names are unique per host, dynvm's carry a random instance id).  SIGKILL ends it and
with it its virtlockd disk leases; libvirt notices the monitor EOF and records the domain shut off, and a
``destroy`` afterwards finds it inactive.  Linux /proc only; elsewhere nothing is found.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from pathlib import Path

PROC = Path("/proc")


def names_guest(argv: list[str], name: str) -> bool:
    """Whether a command line is a QEMU process of the guest ``name`` (``-name guest=NAME[,opts]``)."""
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system-"):
        return False
    for flag, value in itertools.pairwise(argv):
        if flag == "-name" and (value == f"guest={name}" or value.startswith(f"guest={name},")):
            return True
    return False


def qemu_pids(names: set[str], proc: Path = PROC) -> dict[int, str]:
    """pid -> guest name of every running QEMU process of one of ``names``."""
    found: dict[int, str] = {}
    if not names:
        return found
    with contextlib.suppress(OSError):
        entries = [e for e in os.scandir(proc) if e.name.isdigit()]
        for e in entries:
            try:
                raw = (proc / e.name / "cmdline").read_bytes()
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if b"qemu-system-" not in raw:
                continue
            argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
            for name in names:
                if names_guest(argv, name):
                    found[int(e.name)] = name
                    break
    return found


def kill_guests(names: set[str]) -> list[str]:
    """SIGKILL the QEMU processes of ``names``; returns the guest names a process was killed for."""
    killed = set()
    for pid, name in qemu_pids(names).items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.add(name)
    return sorted(killed)
