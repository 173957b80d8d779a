"""Per-host libvirt configuration of the QEMU farm (pure: text in, text out; no I/O).

Each farm host is one libvirtd in its own mount and UTS namespace with private copies of /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt bind-mounted over the real ones
(FARM-NOTES.md).  What must differ between hosts: host UUID, socket directory, migration ports.  What the
farm needs on every host: no cgroups (no systemd), QEMU writing its own logs, QEMU as root (no
dynamic ownership / security driver: every host shares one kernel and one filesystem), and storage leases
through virtlockd on the shared directory so that one disk never runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIGRATION_PORT_BASE = 49200
MIGRATION_PORTS_PER_HOST = 16


@dataclass(frozen=True, slots=True)
class HostPaths:
    """The directories of one farm host (real paths, valid in every mount namespace)."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def channels(self) -> Path:
        """Exec-channel sockets of the guests running here (one per guest)."""
        return self.root / "ch"

    @property
    def serial(self) -> Path:
        """Serial logs of the guests running here (per host: a migrating guest must not share one)."""
        return self.root / "serial"

    @property
    def socket(self) -> Path:
        return self.run / "libvirt-sock"

    def pidfile(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def binds(self) -> list[tuple[Path, str]]:
        """(private dir, system path it hides) for the host's mount namespace."""
        return [
            (self.etc, "/etc/libvirt"),
            (self.run, "/run/libvirt"),
            (self.lib, "/var/lib/libvirt"),
            (self.cache, "/var/cache/libvirt"),
            (self.log, "/var/log/libvirt"),
        ]


def host_uuid(index: int) -> str:
    return f"00000000-0000-4000-8000-{0xD7F0000 + index:012x}"


def migration_ports(index: int) -> tuple[int, int]:
    lo = MIGRATION_PORT_BASE + (index - 1) * MIGRATION_PORTS_PER_HOST
    return lo, lo + MIGRATION_PORTS_PER_HOST - 1


def libvirtd_conf(paths: HostPaths, index: int) -> str:
    return (
        f'unix_sock_dir = "{paths.run}"\n'
        'unix_sock_group = "root"\n'
        'unix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        f'host_uuid = "{host_uuid(index)}"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        # Keepalive off: a libvirtd reniced behind two cores of TCG must not drop a slow client.
        "keepalive_interval = -1\n"
        # An agent boots up to 8 guests at once on one connection, beside its health and reconcile calls:
        # past libvirt's default of 5 requests per client the daemon stops reading that client's socket
        # ("Client hit max requests limit 5" in the log during 5-VM set-ups; the hang seen then was the
        # fork deadlock of farm.DAEMON_ENV, not this).  A production host running an agent wants it too
        # (its libvirtd.conf is the operator's: dynvm does not write it).
        "max_client_requests = 32\n"
    )


def qemu_conf(index: int) -> str:
    lo, hi = migration_ports(index)
    return (
        "cgroup_controllers = [ ]\n"
        'stdio_handler = "file"\n'
        'user = "root"\n'
        'group = "root"\n'
        "dynamic_ownership = 0\n"
        'security_driver = "none"\n'
        'lock_manager = "lockd"\n'
        # No private /dev per QEMU: the host's own mount namespace is already private, and libvirt's
        # per-guest /dev cannot find /dev/pts when the farm runs inside a chroot.
        "namespaces = [ ]\n"
        f"migration_port_min = {lo}\n"
        f"migration_port_max = {hi}\n"
    )


def qemu_lockd_conf(lockspace: Path) -> str:
    return (
        "auto_disk_leases = 1\n"
        "require_lease_for_disks = 1\n"
        f'file_lockspace_dir = "{lockspace}"\n'
    )


def daemon_conf(name: str) -> str:
    """virtlockd.conf / virtlogd.conf: logs into the host's private /var/log/libvirt."""
    return f'log_outputs = "3:file:/var/log/libvirt/{name}.log"\n'


def config_files(paths: HostPaths, index: int, lockspace: Path) -> dict[str, str]:
    """File name (relative to the host's /etc/libvirt copy) -> content to write over the copy's."""
    return {
        "libvirtd.conf": libvirtd_conf(paths, index),
        "qemu.conf": qemu_conf(index),
        "qemu-lockd.conf": qemu_lockd_conf(lockspace),
        "virtlockd.conf": daemon_conf("virtlockd"),
        "virtlogd.conf": daemon_conf("virtlogd"),
    }


def holder_script(paths: HostPaths, hostname: str) -> str:
    """The shell run by ``unshare -m -u`` that sets up the host's mounts and then holds the namespace."""
    lines = ["set -e", "mount --make-rprivate /"]
    for src, dst in paths.binds():
        lines.append(f"mkdir -p '{dst}' && mount --bind '{src}' '{dst}'")
    # What `ip netns exec` did for us: a /sys showing the farm namespace's devices (the bridge), not the
    # machine's.  The old /sys is detached first; if there was none, the new one still goes on top.
    lines.append("umount -l /sys 2>/dev/null || true; mount -t sysfs sysfs /sys")
    lines += [f"hostname '{hostname}'", f"echo $$ > '{paths.pidfile('holder')}.tmp'",
              f"mv '{paths.pidfile('holder')}.tmp' '{paths.pidfile('holder')}'", "exec sleep infinity"]
    return "\n".join(lines) + "\n"
