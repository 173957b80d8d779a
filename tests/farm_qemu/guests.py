"""Test helpers for the QEMU farm: domain specs for the test images, and cleanup of what a test started.

Two XML tweaks live here until provisioner/hypervisor/domxml.py offers them (requested): a QEMU frontend
override ``share-rw=on`` on the data disk (takes QEMU's own image lock out of the way so the storage-lease
test proves virtlockd, FARM-NOTES.md) and ``cache='none'`` on disks.  Migration of a guest with a disk on
the farm's local "shared" directory needs VIR_MIGRATE_UNSAFE, which LibvirtHost.migrate does not offer yet,
so that goes through ``virsh migrate --unsafe``.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.farm.qemu import QemuFarm
from provisioner.hypervisor.domxml import ChannelSpec, DiskSpec, DomainSpec, NicSpec, build_domain_xml
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.probes import SerialMarkerProbe, wait_ready

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
BOOT_DEADLINE_S = 90.0  # TCG on two shared cores; a boot takes ~4-6 s when the machine is quiet


@dataclass
class Guest:
    name: str
    image: str
    host: str
    ip: str | None = None
    mac: str | None = None
    disk: Path | None = None
    share_rw: bool = False


@dataclass
class Guests:
    farm: QemuFarm
    artefacts: Path
    conns: dict[str, LibvirtHost] = field(default_factory=dict)
    started: list[Guest] = field(default_factory=list)

    def conn(self, host: str) -> LibvirtHost:
        if host not in self.conns:
            self.conns[host] = LibvirtHost(self.farm.host_uri(host), call_timeout_s=60.0)
        return self.conns[host]

    def xml(self, g: Guest, host: str) -> str:
        cmdline = "console=ttyS0 quiet panic=-1" + (f" dynvm.ip={g.ip}/24" if g.ip else "")
        spec = DomainSpec(
            name=g.name, uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"dynvm-test/{g.name}")),
            domain_type="qemu", vcpus=1, memory_mib=256,
            kernel=str(self.artefacts / "test" / "vmlinux"),
            initrd=str(self.artefacts / "test" / f"{g.image}.initrd.gz"), cmdline=cmdline,
            disks=(DiskSpec(path=str(g.disk), format="raw"),) if g.disk else (),
            serial_log=str(self.farm.serial_log_path(host, g.name)), console_pty=False,
            nics=(NicSpec(mac=g.mac, bridge=self.farm.bridge),) if g.mac else (),
            channel=ChannelSpec(path=str(self.farm.channel_path(host, g.name)), name="org.dynvm.exec.0"),
        )
        root = ET.fromstring(build_domain_xml(spec))
        for drv in root.iter("driver"):
            drv.set("cache", "none")
        if g.share_rw:
            ov = ET.SubElement(root, f"{{{QEMU_NS}}}override")
            dev = ET.SubElement(ov, f"{{{QEMU_NS}}}device", alias="virtio-disk0")
            fe = ET.SubElement(dev, f"{{{QEMU_NS}}}frontend")
            ET.SubElement(fe, f"{{{QEMU_NS}}}property", name="share-rw", type="bool", value="true")
        return ET.tostring(root, encoding="unicode")

    def start(self, g: Guest, host: str | None = None) -> None:
        host = host or g.host
        log = self.farm.serial_log_path(host, g.name)
        log.unlink(missing_ok=True)
        self.conn(host).define_and_start(g.name, self.xml(g, host))
        g.host = host
        if g not in self.started:
            self.started.append(g)

    def wait_marker(self, g: Guest, marker: str | None = None) -> None:
        log = self.farm.serial_log_path(g.host, g.name)
        probe = SerialMarkerProbe(log, marker or f"DYNVM_READY {g.image}")
        wait_ready(probe, time.monotonic() + BOOT_DEADLINE_S)

    def migrate(self, g: Guest, dest: str) -> None:
        """Live migration with the per-host serial log and channel paths in the destination XML."""
        if g.disk is None:
            self.conn(g.host).migrate(g.name, self.conn(dest), xml=self.xml(g, dest),
                                      migrate_uri=self.farm.migration_uri(dest))
        else:
            with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
                f.write(self.xml(g, dest))
                f.flush()
                subprocess.run(
                    ["virsh", "-c", self.farm.host_uri(g.host), "migrate", "--live", "--unsafe",
                     "--persistent", "--undefinesource", "--xml", f.name,
                     "--migrateuri", self.farm.migration_uri(dest), g.name, self.farm.host_uri(dest)],
                    check=True, capture_output=True, text=True, timeout=120,
                )
        g.host = dest

    def cleanup(self) -> None:
        for g in self.started:
            for h in self.farm.hosts:
                self.conn(h).destroy(g.name)
                self.conn(h).undefine(g.name)
        self.started.clear()
        for c in self.conns.values():
            c.close()
        self.conns.clear()


def qemu_pid(farm: QemuFarm, host: str, name: str) -> int:
    """The pid of a running guest's QEMU (libvirt keeps it in the host's private /run/libvirt/qemu)."""
    return int((farm.paths(host).run / "qemu" / f"{name}.pid").read_text().strip())


def make_raw_disk(path: Path, size_mib: int = 16) -> Path:
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size_mib << 20)
    return path
