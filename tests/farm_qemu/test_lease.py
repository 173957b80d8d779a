"""Storage leases through virtlockd: held while the guest runs, refused elsewhere, freed when QEMU dies.

QEMU's own image lock would refuse the second writer before virtlockd is asked (leases are acquired when
the CPUs start, after QEMU opened the disk), so the disk gets ``share-rw=on`` (tests/farm_qemu/guests.py):
what refuses the second start here is the lease, and the error says so.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from provisioner.errors import DynvmError
from provisioner.farm.qemu import QemuFarm
from provisioner.interfaces import DomainState
from tests.conftest import wait_until
from tests.farm_qemu.guests import Guest, Guests, make_raw_disk, qemu_pid

pytestmark = pytest.mark.qemu


def lock_holders(path: Path) -> set[int]:
    """Pids holding a POSIX lock on ``path`` (from /proc/locks)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:  # virtlockd unlinks a lease file when its last holder releases it
        return set()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and f[1] == "POSIX" and f[5] == dev:
            out.add(int(f[4]))
    return out


def virtlockd_pid(farm: QemuFarm, host: str) -> int:
    return int(farm.paths(host).pidfile("virtlockd").read_text())


def test_lease_held_refused_and_released(guests: Guests) -> None:
    farm = guests.farm
    disk = make_raw_disk(farm.shared_dir / "lease-se.raw")
    g = Guest("lease-se", "se", "hv1", disk=disk, share_rw=True)
    guests.start(g)
    lease = farm.lockspace_dir / hashlib.sha256(str(disk).encode()).hexdigest()
    # Held: the lease file exists in the shared lockspace and hv1's virtlockd holds its lock.
    wait_until(lambda: lease.exists() and virtlockd_pid(farm, "hv1") in lock_holders(lease),
               timeout=10, what="hv1's virtlockd to hold the lease")
    # Refused: the same disk on another host fails on the lease, not on QEMU's image lock.
    with pytest.raises(DynvmError, match=r"resource busy: Lockspace resource '[0-9a-f]{64}' is locked"):
        guests.conn("hv2").define_and_start(g.name, guests.xml(g, "hv2"))
    assert guests.conn("hv1").state(g.name) is DomainState.RUNNING
    # Released: SIGKILL the guest's QEMU; the lock goes and the disk starts on hv2.
    os.kill(qemu_pid(farm, "hv1", g.name), signal.SIGKILL)
    wait_until(lambda: not lock_holders(lease), timeout=10, what="the lease to be released")
    guests.start(g, "hv2")
    assert virtlockd_pid(farm, "hv2") in lock_holders(lease)
    assert virtlockd_pid(farm, "hv1") not in lock_holders(lease)
