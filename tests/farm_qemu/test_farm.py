"""The farm: hosts are distinct libvirtds, guests run reniced, up is idempotent, down leaves nothing."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from provisioner.errors import PermanentError
from provisioner.farm.qemu import QemuFarm
from provisioner.farm.qemu.procs import pid_alive
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.interfaces import DomainState
from tests.farm_qemu.guests import Guest, Guests, qemu_pid

pytestmark = pytest.mark.qemu


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[16])


def test_hosts_are_distinct_and_up_is_idempotent(qemu_farm: QemuFarm) -> None:
    assert qemu_farm.up() == {"up_s": 0.0}  # already up: nothing restarted
    uuids = set()
    for h in qemu_farm.hosts:
        conn = LibvirtHost(qemu_farm.host_uri(h))
        try:
            assert conn.hostname() == h
            uuids.add(conn.host_uuid())
        finally:
            conn.close()
    assert len(uuids) == 3
    st = os.stat("/dev/kvm")
    assert st.st_gid == grp.getgrnam("kvm").gr_gid and stat.S_IMODE(st.st_mode) == 0o660


def test_guests_run_reniced(guests: Guests) -> None:
    g = Guest("nice-wn", "lhcb-wn", "hv3")
    guests.start(g)
    assert guests.conn("hv3").state(g.name) is DomainState.RUNNING
    assert nice_of(qemu_pid(guests.farm, "hv3", g.name)) == 10
    assert nice_of(os.getpid()) < 10


def test_down_leaves_nothing_behind(tmp_path: Path, qemu_images: Path) -> None:
    farm = QemuFarm(tmp_path / "f", 1, netns="dynvm-downtest")
    farm.up()
    g = Guests(farm, qemu_images)
    guest = Guest("down-wn", "cms-wn", "hv1")
    g.start(guest)
    pid = qemu_pid(farm, "hv1", guest.name)
    holder = int(farm.paths("hv1").pidfile("holder").read_text())
    g.conns["hv1"].close()
    farm.down()
    assert farm.leftovers() == []
    assert not pid_alive(pid) and not pid_alive(holder)
    assert not Path("/run/netns/dynvm-downtest").exists()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    farm.down()  # idempotent


def test_not_root_is_a_clear_error(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # child: drop root, try, report through the exit status
        code = 3
        try:
            os.setuid(65534)
            QemuFarm(tmp_path, 1).up()
        except PermanentError as e:
            code = 0 if "needs root" in str(e) else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_guest_tick_counter_visible(guests: Guests) -> None:
    g = Guest("tick-wn", "atlas-wn", "hv2")
    guests.start(g)
    guests.wait_marker(g, "DYNVM_TICK 2 ")
    log = guests.farm.serial_log_path("hv2", g.name).read_text()
    assert "DYNVM_READY atlas-wn vo=atlas" in log and "DYNVM_TICK 1 " in log
