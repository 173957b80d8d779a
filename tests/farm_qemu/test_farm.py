"""The farm: hosts are distinct libvirtds, guests run reniced, up is idempotent, down leaves nothing."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
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


def threads_left(pid: int) -> list[str]:
    """Threads of ``pid`` that have not exited yet (a zombie main thread does not count; its siblings do)."""
    task = Path(f"/proc/{pid}/task")
    left = []
    for t in task.iterdir() if task.exists() else []:
        try:
            state = (t / "stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if state not in "ZX":
            left.append(f"{t.name}:{state}")
    return left


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
    for h in qemu_farm.hosts:  # each host's /sys is the farm namespace's (what `ip netns exec` gave)
        holder = int(qemu_farm.paths(h).pidfile("holder").read_text())
        assert Path(f"/proc/{holder}/root/sys/class/net/{qemu_farm.bridge}").exists()
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
    assert threads_left(pid) == []  # the guest is gone when down() returns, not a second later
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


CHROOT_SH = """set -e
R=$1; shift
mount --make-rprivate /
for d in usr etc root proc sys dev run tmp $EXTRA; do mkdir -p "$R/$d"; mount --rbind "/$d" "$R/$d"; done
for l in bin lib lib64 sbin; do [ -e "$R/$l" ] || ln -s "usr/$l" "$R/$l"; done
exec chroot "$R" "$@"
"""
MAKE_NETNS = """
import subprocess, sys
from pathlib import Path
from provisioner.farm.qemu import QemuFarm
farm = QemuFarm(Path(sys.argv[1]), 1, netns="dynvm-chroottest")
try:
    farm._make_netns()
    ns = "--net=/run/netns/dynvm-chroottest"
    subprocess.run(["nsenter", ns, "ip", "link", "show", "dvbr0"], check=True)
finally:
    subprocess.run(["ip", "netns", "del", "dynvm-chroottest"], check=False)
"""


def test_farm_network_is_made_inside_a_plain_chroot(tmp_path: Path) -> None:
    """`/` is not a mount point in a plain chroot: `ip -n NS` fails there, nsenter does not."""
    root = tmp_path / "root"
    root.mkdir()
    sh = tmp_path / "chroot.sh"
    sh.write_text(CHROOT_SH)
    # The checkout and its venv live wherever the clone is (/work, /check/work, ...): bind their tops too.
    paths = (sys.executable, __file__, *sys.path)
    tops = {Path(p).parts[1] for p in paths if p.startswith("/") and len(Path(p).parts) > 1}
    bound = {"usr", "etc", "root", "proc", "sys", "dev", "run", "tmp", "bin", "lib", "lib64", "sbin"}
    extra = " ".join(sorted(tops - bound))
    p = subprocess.run(
        ["unshare", "-m", "sh", str(sh), str(root), sys.executable, "-c", MAKE_NETNS, str(tmp_path / "f")],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "EXTRA": extra},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert not Path("/run/netns/dynvm-chroottest").exists()
