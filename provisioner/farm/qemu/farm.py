"""The real QEMU farm on one machine: N libvirtd "hosts" sharing one storage dir and one LAN.

Shape (FARM-NOTES.md): one network namespace for the whole farm holding bridge ``dvbr0`` (the site LAN
in miniature, 10.77.0.0/24, the bridge itself at .1).  Each host is a holder process
``nsenter --net=/run/netns/NS unshare -m -u`` whose mount namespace bind-mounts the host's private libvirt
dirs (and a sysfs of the farm's network namespace, as ``ip netns exec`` would mount); its
virtlockd, virtlogd and libvirtd are started into that namespace with nsenter, so every guest QEMU of the
host lives there too and attaches its tap to the one bridge.  libvirtd (hence every QEMU it forks) runs at
nice 10 so agents and monitors keep their heartbeats on time while TCG boots fill the cores.

Truth: the processes themselves; ``<base>/qemu-farm.json`` records pids and namespace inodes so that
``down()`` finds everything again (and falls back to the netns by name if the record is lost); a record
from an earlier boot is ignored (its inodes and pids now belong to others).  Every farm process is in the
farm's network namespace, so killing that namespace's processes ends the farm.

Namespaces are entered with ``nsenter --net=/run/netns/NS``, never ``ip -n NS`` / ``ip netns exec``: those
do ``mount --make-rslave /``, which fails where ``/`` is not a mount point (a plain chroot).
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from provisioner.errors import PermanentError, UnavailableError, ValidationError
from provisioner.farm.qemu.hostconf import (
    HostPaths,
    config_files,
    holder_script,
    migration_ports,
)
from provisioner.farm.qemu.procs import (
    boot_id,
    kill_ns,
    ns_inode,
    pid_alive,
    pids_in_ns,
    read_pid,
    run,
    wait_for,
)

TOOLS = ("ip", "unshare", "nsenter", "nice", "virsh", "libvirtd", "virtlockd", "virtlogd",
         "qemu-system-x86_64")
LIB_SUBDIRS = ("qemu", "qemu/channel/target", "qemu/save", "qemu/snapshot", "qemu/dump", "qemu/ram",
               "qemu/nvram", "images", "lockd", "boot")
GUEST_NICE = 10
# libvirtd forks each QEMU and, in the child before exec, connects to virtlockd (lockd plugin) through
# GObject allocations; with Debian 12's glib 2.74 g_slice has its own locks, which fork does not reset:
# a start forked while another thread held one hangs for ever (gdb: child in g_slice_alloc under
# virDomainLockProcessStart), and every later call on that domain with it.  Seen on a revived host
# during 5 concurrent set-up boots in 2 of 4 bench_failover runs.  always-malloc makes g_slice use
# glibc malloc, whose locks fork resets.  (glib >= 2.76 does this itself.)
DAEMON_ENV = {**os.environ, "G_SLICE": "always-malloc"}
START_TIMEOUT_S = 30.0


class QemuFarm:
    """One QEMU farm rooted at ``base`` with hosts hv1..hvN (``hosts`` is the list of their names)."""

    def __init__(self, base: Path, hosts: int, netns: str | None = None) -> None:
        if not 1 <= hosts <= 16:
            raise ValidationError(f"qemu farm: hosts={hosts} out of range 1..16")
        self.base = Path(base).resolve()
        self.hosts = [f"hv{i}" for i in range(1, hosts + 1)]
        self.netns = netns or "dynvm-" + hashlib.sha256(str(self.base).encode()).hexdigest()[:8]
        self.bridge = "dvbr0"
        self.subnet = "10.77.0.0/24"
        self.gateway = "10.77.0.1"
        self.shared_dir = self.base / "shared"
        self.lockspace_dir = self.shared_dir / "lockspace"
        self.state_file = self.base / "qemu-farm.json"
        self.timings: dict[str, float] = {}

    # ---- addresses -------------------------------------------------------------------------------
    def paths(self, host: str) -> HostPaths:
        if host not in self.hosts:
            raise ValidationError(f"qemu farm: unknown host {host!r} (have {', '.join(self.hosts)})")
        return HostPaths(self.base / "hosts" / host)

    def host_uri(self, host: str) -> str:
        return f"qemu+unix:///system?socket={self.paths(host).socket}"

    def host_uris(self) -> dict[str, str]:
        return {h: self.host_uri(h) for h in self.hosts}

    def migration_uri(self, host: str) -> str:
        """Where ``host`` receives migrations: its own port range on the farm netns' loopback (host names
        do not resolve; every host shares the namespace, so the ports must differ)."""
        return f"tcp://127.0.0.1:{migration_ports(self.hosts.index(host) + 1)[0]}"

    def channel_path(self, host: str, domain: str) -> Path:
        """The exec-channel socket of ``domain`` while it runs on ``host`` (per host: see migration)."""
        return self.paths(host).channels / f"{domain}.sock"

    def serial_log_path(self, host: str, domain: str) -> Path:
        return self.paths(host).serial / f"{domain}.log"

    # ---- state -----------------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any] | None:
        """The record of the running farm; None when missing, unreadable or written before a reboot."""
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("boot_id") != boot_id():
            return None
        return data

    def is_up(self) -> bool:
        st = self._read_state()
        if st is None or st.get("netns_inode") != ns_inode(f"/run/netns/{self.netns}"):
            return False
        for h in self.hosts:
            rec = st.get("hosts", {}).get(h)
            if rec is None or not all(pid_alive(rec.get(d)) for d in ("holder", "virtlockd", "libvirtd")):
                return False
            if not self.paths(h).socket.exists():
                return False
        return True

    # ---- up --------------------------------------------------------------------------------------
    def up(self) -> dict[str, float]:
        """Bring the farm up (idempotent); returns timings in seconds."""
        t0 = time.monotonic()
        self._preflight()
        if self.is_up():
            return {"up_s": 0.0}
        self.down()  # leftovers of a half-started or crashed farm
        try:
            self._make_netns()
            for i, h in enumerate(self.hosts, 1):
                self._prepare_host(h, i)
            holders = self._start_holders()
            daemons = self._start_daemons(holders)
        except BaseException:
            self.down()
            raise
        hosts: dict[str, dict[str, Any]] = {}
        state: dict[str, Any] = {"netns": self.netns, "netns_inode": ns_inode(f"/run/netns/{self.netns}"),
                                 "boot_id": boot_id(), "bridge": self.bridge, "hosts": hosts}
        for h in self.hosts:
            hosts[h] = {"holder": holders[h], "mnt_inode": ns_inode(f"/proc/{holders[h]}/ns/mnt"),
                                 **daemons[h], "uri": self.host_uri(h)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)
        self.timings["up_s"] = time.monotonic() - t0
        return dict(self.timings)

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise PermanentError(
                f"qemu farm {self.base}: needs root (uid {os.geteuid()}); it creates network and mount "
                "namespaces and runs libvirtd per host"
            )
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise UnavailableError(f"qemu farm: missing {', '.join(missing)} (deploy/install.sh has them)")
        fix_kvm_permissions()

    def _make_netns(self) -> None:
        ns, br = self.netns, self.bridge
        run(["ip", "netns", "add", ns], f"create netns {ns}")
        run(self._in_netns(["ip", "link", "set", "lo", "up"]), f"netns {ns}: lo up")
        bridge = ["ip", "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0"]
        run(self._in_netns(bridge), f"netns {ns}: create bridge {br}")
        address = ["ip", "addr", "add", f"{self.gateway}/24", "dev", br]
        run(self._in_netns(address), f"netns {ns}: address {br}")
        run(self._in_netns(["ip", "link", "set", br, "up"]), f"netns {ns}: {br} up")

    def _in_netns(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the farm's network namespace (nsenter: works where ``ip -n`` does not)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def _prepare_host(self, host: str, index: int) -> None:
        p = self.paths(host)
        for d in (p.run, p.cache, p.log, p.channels, p.serial, self.lockspace_dir):
            d.mkdir(parents=True, exist_ok=True)
        for sub in LIB_SUBDIRS:
            (p.lib / sub).mkdir(parents=True, exist_ok=True)
        if not p.etc.exists():
            shutil.copytree("/etc/libvirt", p.etc, symlinks=True)
        for link in (p.etc / "qemu" / "networks" / "autostart").glob("*"):
            link.unlink()  # no default NAT network: guests use the farm bridge
        for name, text in config_files(p, index, self.lockspace_dir).items():
            (p.etc / name).write_text(text)
        for stale in [*p.run.iterdir(), *p.channels.iterdir()]:
            if not stale.is_dir():
                stale.unlink()
        for daemon in ("holder", "virtlockd", "virtlogd", "libvirtd"):
            p.pidfile(daemon).unlink(missing_ok=True)

    def _start_holders(self, hosts: list[str] | None = None) -> dict[str, int]:
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for h in hosts or self.hosts:
            p = self.paths(h)
            with (p.root / "holder.log").open("wb") as logf:
                procs[h] = subprocess.Popen(
                    self._in_netns(["unshare", "-m", "-u", "--propagation", "private",
                                    "sh", "-c", holder_script(p, h)]),
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                )
        holders: dict[str, int] = {}
        for h, proc in procs.items():
            pf = self.paths(h).pidfile("holder")
            wait_for(pf, f"qemu farm host {h}: namespace holder", START_TIMEOUT_S, alive=proc.pid)
            pid = read_pid(pf)
            if pid is None:
                raise UnavailableError(f"qemu farm host {h}: unreadable {pf}")
            holders[h] = pid
        return holders

    def _nsenter(self, holder: int, argv: list[str]) -> list[str]:
        # -r: keep the holder's root directory (entering a mount namespace otherwise resets it to the
        # namespace's real root, which breaks the farm inside a chroot).
        return ["nsenter", "-t", str(holder), "-m", "-u", "-n", "-r", "--", *argv]

    def _start_daemons(self, holders: dict[str, int]) -> dict[str, dict[str, int]]:
        """virtlockd and virtlogd first (libvirtd needs virtlockd for leases), then libvirtd at nice 10."""
        hosts = list(holders)
        out: dict[str, dict[str, int]] = {h: {} for h in hosts}
        for stage in (("virtlockd", "virtlogd"), ("libvirtd",)):
            procs = []
            for h in hosts:
                for d in stage:
                    pf = self.paths(h).pidfile(d)
                    argv = [d, "-d", "-f", f"/etc/libvirt/{d}.conf", "-p", str(pf)]
                    if d == "libvirtd":
                        argv = ["nice", "-n", str(GUEST_NICE), *argv]
                    procs.append((h, d, subprocess.Popen(self._nsenter(holders[h], argv), env=DAEMON_ENV,
                                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                         stderr=subprocess.PIPE)))
            for h, d, proc in procs:
                _, err = proc.communicate(timeout=START_TIMEOUT_S)
                if proc.returncode != 0:
                    raise UnavailableError(f"qemu farm host {h}: {d} failed to start: {err.decode().strip()}")
                pf = self.paths(h).pidfile(d)
                wait_for(pf, f"qemu farm host {h}: {d} pidfile", START_TIMEOUT_S)
                pid = read_pid(pf)
                if pid is None:
                    raise UnavailableError(f"qemu farm host {h}: unreadable {pf}")
                out[h][d] = pid
        for h in hosts:
            wait_for(self.paths(h).socket, f"qemu farm host {h}: libvirtd socket", START_TIMEOUT_S,
                     alive=out[h]["libvirtd"])
        self._check_libvirtd(hosts)
        return out

    def _check_libvirtd(self, hosts: list[str]) -> None:
        """libvirtd listens before its drivers are initialised (and exits if that fails): one real call
        per host, in parallel, proves each host usable."""
        procs = {h: subprocess.Popen(["virsh", "-c", self.host_uri(h), "uri"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for h in hosts}
        for h, proc in procs.items():
            _, err = proc.communicate(timeout=START_TIMEOUT_S)
            if proc.returncode != 0:
                log = self.paths(h).log / "libvirtd.log"
                raise UnavailableError(f"qemu farm host {h}: libvirtd is not usable "
                                       f"({err.decode().strip().splitlines()[-1:]}); see {log}")

    # ---- one host dies and comes back (dynvm farm kill / revive) ----------------------------------
    def kill_host(self, host: str) -> int:
        """SIGKILL everything of ``host`` at once: every process in its mount namespace (namespace holder,
        virtlockd, virtlogd, libvirtd and every guest QEMU), as a power cut would; returns how many.
        Nothing restarts them (they are not supervised) until :meth:`revive_host`."""
        self.paths(host)  # validates the name
        rec = (self._read_state() or {}).get("hosts", {}).get(host)
        if rec is None or not rec.get("mnt_inode"):
            raise UnavailableError(f"qemu farm: host {host} is not up (no record in {self.state_file})")
        inode = _live_mnt_ns(rec)
        return 0 if inode is None else kill_ns("mnt", inode)

    def host_up(self, host: str) -> bool:
        rec = (self._read_state() or {}).get("hosts", {}).get(host)
        return rec is not None and all(pid_alive(rec.get(d)) for d in ("holder", "virtlockd", "libvirtd"))

    def revive_host(self, host: str) -> dict[str, Any]:
        """Start ``host``'s namespace and daemons again (fresh virtlockd: the old leases died with it);
        its guests do not come back by themselves.  Idempotent: a host that is up is left as it is."""
        st = self._read_state()
        if st is None or st.get("netns_inode") != ns_inode(f"/run/netns/{self.netns}"):
            raise UnavailableError(f"qemu farm {self.base} is not up")
        if self.host_up(host):
            return dict(st["hosts"][host])
        stale = _live_mnt_ns(st["hosts"].get(host, {}))
        if stale is not None:
            kill_ns("mnt", stale)  # whatever is left of a half-dead host
        self._prepare_host(host, self.hosts.index(host) + 1)
        holders = self._start_holders([host])
        daemons = self._start_daemons(holders)
        rec = {"holder": holders[host], "mnt_inode": ns_inode(f"/proc/{holders[host]}/ns/mnt"),
               **daemons[host], "uri": self.host_uri(host)}
        st = self._read_state() or st
        st["hosts"][host] = rec
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=2) + "\n")
        os.replace(tmp, self.state_file)
        return rec

    # ---- down ------------------------------------------------------------------------------------
    def down(self) -> None:
        """Stop every farm process and guest, drop the namespace; leaves nothing behind (or raises)."""
        t0 = time.monotonic()
        st = self._read_state() or {}
        # Host namespaces still in use (a killed host's recorded inode may belong to somebody else now).
        live = {h: _live_mnt_ns(rec) for h, rec in st.get("hosts", {}).items()}
        st = {**st, "hosts": {h: {**rec, "mnt_inode": live[h]} for h, rec in st.get("hosts", {}).items()}}
        net = ns_inode(f"/run/netns/{self.netns}") or st.get("netns_inode")
        if net:
            kill_ns("net", int(net))
        for inode in live.values():
            if inode is not None:
                kill_ns("mnt", inode)
        if Path(f"/run/netns/{self.netns}").exists():
            run(["ip", "netns", "del", self.netns], f"delete netns {self.netns}")
        self.state_file.unlink(missing_ok=True)
        for h in self.hosts:
            p = HostPaths(self.base / "hosts" / h)
            for daemon in ("holder", "virtlockd", "virtlogd", "libvirtd"):
                p.pidfile(daemon).unlink(missing_ok=True)
            for d in (p.run, p.channels):
                for stale in d.iterdir() if d.is_dir() else []:
                    if not stale.is_dir():
                        stale.unlink()
        left = self.leftovers(st)
        if left:
            raise UnavailableError(f"qemu farm {self.base}: down left {'; '.join(left)}")
        self.timings["down_s"] = time.monotonic() - t0

    def leftovers(self, state: dict[str, Any] | None = None) -> list[str]:
        """What of the farm still exists: processes, mounts, the namespace (empty when fully down)."""
        st = state if state is not None else (self._read_state() or {})
        left: list[str] = []
        net = ns_inode(f"/run/netns/{self.netns}")
        if net is not None:
            left.append(f"netns {self.netns}")
            left += [f"pid {p} in netns" for p in pids_in_ns("net", net)]
        for h, rec in st.get("hosts", {}).items():
            if rec.get("mnt_inode"):
                mnt = int(rec["mnt_inode"])
                left += [f"pid {p} in {h}'s mount namespace" for p in pids_in_ns("mnt", mnt)]
            for d in ("holder", "virtlockd", "virtlogd", "libvirtd"):
                if pid_alive(rec.get(d)):
                    left.append(f"{h} {d} pid {rec[d]}")
        with open("/proc/self/mountinfo") as f:
            left += [f"mount {line.split()[4]}" for line in f
                     if str(self.base) in line or f"/run/netns/{self.netns}" in line]
        return left


def _live_mnt_ns(rec: dict[str, Any]) -> int | None:
    """The host's recorded mount namespace, only while one of its recorded processes still lives in it:
    a dead namespace's inode number is reused (the next revived host's namespace got it once, and was
    killed in its place)."""
    inode = rec.get("mnt_inode")
    if not inode:
        return None
    pids = [rec.get(d) for d in ("holder", "virtlockd", "virtlogd", "libvirtd")]
    alive = any(pid_alive(p) and ns_inode(f"/proc/{p}/ns/mnt") == int(inode) for p in pids)
    return int(inode) if alive else None


def fix_kvm_permissions(dev: str = "/dev/kvm") -> None:
    """root:kvm 0660 on /dev/kvm (with 0600 libvirtd re-probes QEMU on every call: 30-45 s defines)."""
    if not os.path.exists(dev):
        return  # TCG works without it
    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        raise UnavailableError("qemu farm: group kvm does not exist (install qemu-system-x86)") from None
    st = os.stat(dev)
    if st.st_gid != gid or stat.S_IMODE(st.st_mode) != 0o660:
        os.chown(dev, 0, gid)
        os.chmod(dev, 0o660)
        st = os.stat(dev)
    if st.st_gid != gid or stat.S_IMODE(st.st_mode) != 0o660:
        raise UnavailableError(f"qemu farm: {dev} is not root:kvm 0660 after chown/chmod")
