"""Pure libvirt domain XML builder (STYLE.md 11: build XML, never format it).

Every value that may come from a user, a job or the catalogue is validated here before it reaches the
tree, even though ElementTree escapes text: a value that is not what its field promises (a MAC that is not
a MAC, a path with ``..``) is a bug or an attack either way, so it is refused with a ValidationError that
names the field.  The builder does no I/O.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field

from provisioner.catalogue.model import CMDLINE_RE
from provisioner.errors import ValidationError

DYNVM_NS = "https://dynvm.example/xmlns/dynvm/1"
DYNVM_PREFIX = "dynvm"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"  # <qemu:override>, <qemu:capabilities>
# libvirt >= 4.x reads a started x86 guest's CPU back through QEMU's generic path when QEMU advertises
# ``unavailable-features``: with libvirt 9.0 / QEMU 7.2 (Debian 12) that is one QMP qom-get per CPU
# property (~415 commands, ~1.5 MB of replies, ~49,000 monitor syscalls; QEMU reads its monitor one byte at a
# time), about 0.25 s of QEMU CPU per start.  Without the capability libvirt takes its x86 path (two
# qom-gets: feature-words, filtered-features) to the same result: same QEMU command line, same live <cpu>
# (tests/farm_qemu/test_cpu_readback.py), ~1,100 syscalls.  libvirt marks such a domain tainted
# (custom-hypervisor-feature) in its log.  Newer libvirt with QEMU >= 10.1 fetches all in one qom-list-get.
X86_CPU_READBACK_CAPABILITY = "cpu-unavailable-features"
METADATA_ROOT = "instance"
# The metadata keys every dynvm domain carries; others matching KEY_RE are allowed for later needs.
STANDARD_METADATA_KEYS = ("instance_id", "role", "vo", "owner", "image")

DOMAIN_TYPES = frozenset({"kvm", "qemu", "test"})
DISK_FORMATS = frozenset({"qcow2", "raw"})
NIC_MODELS = frozenset({"virtio", "e1000", "rtl8139"})

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
TARGET_DEV_RE = re.compile(r"^(vd|sd|hd)[a-z]{1,2}$")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")  # IFNAMSIZ - 1
NETWORK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CHANNEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Shared-storage paths: a deliberately small alphabet (no ':' either: QEMU reads it as a protocol prefix).
PATH_RE = re.compile(r"^/[A-Za-z0-9._/+@-]{0,4095}$")
KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# Metadata values: VO names, "slurm:1234", "cms-wn:2026.11.2", instance ids.  No space, quote, bracket,
# ampersand or control character, so a value can never look like markup even to a careless reader.
VALUE_RE = re.compile(r"^[A-Za-z0-9._:@+/=-]{1,256}$")
MAX_METADATA_KEYS = 16
SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the NUL

ET.register_namespace(DYNVM_PREFIX, DYNVM_NS)
ET.register_namespace("qemu", QEMU_NS)


@dataclass(frozen=True, slots=True)
class DiskSpec:
    path: str
    format: str = "qcow2"
    target: str = "vda"
    readonly: bool = False
    shareable: bool = False
    # Test-only (ha.share_rw_data_disks): QEMU's frontend property share-rw=on, which takes QEMU's own image
    # lock out of the way so that only the storage lease (virtlockd) can refuse a second start.  QEMU keeps
    # its lock on a qcow2 image whatever the frontend says, hence raw only; virtio targets only.
    share_rw: bool = False


@dataclass(frozen=True, slots=True)
class NicSpec:
    mac: str
    bridge: str | None = None  # exactly one of bridge / network
    network: str | None = None
    model: str = "virtio"


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """A virtio-serial port backed by a unix socket on the host (the job channel)."""

    path: str
    name: str = "org.dynvm.exec.0"


@dataclass(frozen=True, slots=True)
class DomainSpec:
    name: str
    uuid: str
    domain_type: str
    vcpus: int
    memory_mib: int
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    serial_log: str | None = None
    # With a pty console `virsh console` works and the serial log is kept by a <log> element;
    # without, the serial port writes straight to serial_log (type='file').
    console_pty: bool = True
    nics: tuple[NicSpec, ...] = ()
    channel: ChannelSpec | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    # config guest_cpu_readback "x86": libvirt reads the started guest's CPU back its x86 way (see
    # X86_CPU_READBACK_CAPABILITY); QEMU/KVM domains only.
    x86_cpu_readback: bool = False


def _check(pattern: re.Pattern[str], value: object, where: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValidationError(f"{where}: invalid value {value!r}")
    return value


def _check_path(value: object, where: str, max_len: int = 4096) -> str:
    path = _check(PATH_RE, value, where)
    if len(path) > max_len:
        raise ValidationError(f"{where}: path longer than {max_len} characters")
    if any(part in ("..", ".") for part in path.split("/")):
        raise ValidationError(f"{where}: path {path!r} must not contain '.' or '..' components")
    return path


def _check_int(value: object, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(f"{where}: {value!r} is not an integer in [{lo}, {hi}]")
    return value


def validate_metadata(metadata: Mapping[str, str]) -> None:
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValidationError(f"metadata: more than {MAX_METADATA_KEYS} keys")
    for key, value in metadata.items():
        _check(KEY_RE, key, "metadata key")
        _check(VALUE_RE, value, f"metadata.{key}")


def validate_spec(spec: DomainSpec) -> None:
    """Raise ValidationError naming the first bad field of ``spec``."""
    _check(NAME_RE, spec.name, "name")
    _check(UUID_RE, spec.uuid, "uuid")
    if spec.domain_type not in DOMAIN_TYPES:
        raise ValidationError(f"domain_type: {spec.domain_type!r} is not one of {sorted(DOMAIN_TYPES)}")
    _check_int(spec.vcpus, 1, 1024, "vcpus")
    _check_int(spec.memory_mib, 16, 4 * 1024 * 1024, "memory_mib")
    if spec.kernel is not None:
        _check_path(spec.kernel, "kernel")
    if spec.initrd is not None:
        _check_path(spec.initrd, "initrd")
    if (spec.initrd is not None or spec.cmdline is not None) and spec.kernel is None:
        raise ValidationError("kernel: initrd/cmdline given without a kernel")
    if spec.cmdline is not None:
        _check(CMDLINE_RE, spec.cmdline, "cmdline")
    targets: set[str] = set()
    for i, disk in enumerate(spec.disks):
        _check_path(disk.path, f"disks[{i}].path")
        if disk.format not in DISK_FORMATS:
            raise ValidationError(f"disks[{i}].format: {disk.format!r} is not one of {sorted(DISK_FORMATS)}")
        _check(TARGET_DEV_RE, disk.target, f"disks[{i}].target")
        if disk.target in targets:
            raise ValidationError(f"disks[{i}].target: {disk.target!r} used twice")
        targets.add(disk.target)
        if disk.share_rw and (disk.format != "raw" or not disk.target.startswith("vd") or disk.shareable):
            raise ValidationError(f"disks[{i}].share_rw: only for a raw, virtio, not shareable disk")
    if spec.serial_log is not None:
        _check_path(spec.serial_log, "serial_log")
    for i, nic in enumerate(spec.nics):
        _check(MAC_RE, nic.mac, f"nics[{i}].mac")
        if int(nic.mac[:2], 16) & 1:
            raise ValidationError(f"nics[{i}].mac: {nic.mac!r} is a multicast address")
        if (nic.bridge is None) == (nic.network is None):
            raise ValidationError(f"nics[{i}]: give exactly one of bridge or network")
        if nic.bridge is not None:
            _check(BRIDGE_RE, nic.bridge, f"nics[{i}].bridge")
        if nic.network is not None:
            _check(NETWORK_RE, nic.network, f"nics[{i}].network")
        if nic.model not in NIC_MODELS:
            raise ValidationError(f"nics[{i}].model: {nic.model!r} is not one of {sorted(NIC_MODELS)}")
    if spec.channel is not None:
        _check_path(spec.channel.path, "channel.path", max_len=SUN_PATH_MAX)
        _check(CHANNEL_NAME_RE, spec.channel.name, "channel.name")
    validate_metadata(spec.metadata)
    if spec.x86_cpu_readback and spec.domain_type not in ("kvm", "qemu"):
        raise ValidationError(f"x86_cpu_readback: only for kvm/qemu domains, not {spec.domain_type!r}")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _metadata(parent: ET.Element, metadata: Mapping[str, str]) -> None:
    md = _sub(parent, "metadata")
    root = _sub(md, f"{{{DYNVM_NS}}}{METADATA_ROOT}")
    for key, value in metadata.items():
        _sub(root, f"{{{DYNVM_NS}}}{key}", value)


def _os_and_cpu(dom: ET.Element, spec: DomainSpec) -> None:
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64")
    if spec.kernel is not None:
        _sub(os_el, "kernel", spec.kernel)
        if spec.initrd is not None:
            _sub(os_el, "initrd", spec.initrd)
        if spec.cmdline is not None:
            _sub(os_el, "cmdline", spec.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")  # without ACPI a guest poweroff only halts (FARM-NOTES)
    if spec.domain_type == "qemu":
        cpu = _sub(dom, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", "qemu64", fallback="allow")
    elif spec.domain_type == "kvm":
        _sub(dom, "cpu", mode="host-model")  # migratable, unlike host-passthrough


def _serial(devices: ET.Element, spec: DomainSpec) -> None:
    if spec.serial_log is not None and not spec.console_pty:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=spec.serial_log)
        _sub(serial, "target", port="0")
        return
    serial = _sub(devices, "serial", type="pty")
    if spec.serial_log is not None:
        _sub(serial, "log", file=spec.serial_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")


def _devices(dom: ET.Element, spec: DomainSpec) -> None:
    devices = _sub(dom, "devices")
    for disk in spec.disks:
        d = _sub(devices, "disk", type="file", device="disk")
        _sub(d, "driver", name="qemu", type=disk.format)
        _sub(d, "source", file=disk.path)
        _sub(d, "target", dev=disk.target, bus="virtio" if disk.target.startswith("vd") else "sata")
        if disk.readonly:
            _sub(d, "readonly")
        if disk.shareable:
            _sub(d, "shareable")
    for nic in spec.nics:
        kind = "bridge" if nic.bridge is not None else "network"
        n = _sub(devices, "interface", type=kind)
        _sub(n, "mac", address=nic.mac)
        _sub(n, "source", **{kind: nic.bridge if nic.bridge is not None else str(nic.network)})
        _sub(n, "model", type=nic.model)
    _serial(devices, spec)
    if spec.channel is not None:
        ch = _sub(devices, "channel", type="unix")
        _sub(ch, "source", mode="bind", path=spec.channel.path)
        _sub(ch, "target", type="virtio", name=spec.channel.name)
    _sub(devices, "memballoon", model="none")


def _disk_index(target: str) -> int:
    """libvirt's index of a disk target (vda -> 0, vdz -> 25, vdaa -> 26): its alias is virtio-disk<index>."""
    n = 0
    for c in target[2:]:
        n = n * 26 + ord(c) - ord("a") + 1
    return n - 1


def _qemu_capabilities(dom: ET.Element, spec: DomainSpec) -> None:
    if spec.x86_cpu_readback:
        caps = _sub(dom, f"{{{QEMU_NS}}}capabilities")
        _sub(caps, f"{{{QEMU_NS}}}del", capability=X86_CPU_READBACK_CAPABILITY)


def _qemu_overrides(dom: ET.Element, spec: DomainSpec) -> None:
    shared = [d for d in spec.disks if d.share_rw]
    if not shared:
        return
    ov = _sub(dom, f"{{{QEMU_NS}}}override")
    for disk in shared:
        dev = _sub(ov, f"{{{QEMU_NS}}}device", alias=f"virtio-disk{_disk_index(disk.target)}")
        fe = _sub(dev, f"{{{QEMU_NS}}}frontend")
        _sub(fe, f"{{{QEMU_NS}}}property", name="share-rw", type="bool", value="true")


def build_domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML for ``spec``; ValidationError naming the field if a value is unsafe."""
    validate_spec(spec)
    dom = ET.Element("domain", type=spec.domain_type)
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    if spec.metadata:
        _metadata(dom, spec.metadata)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    _os_and_cpu(dom, spec)
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    _devices(dom, spec)
    _qemu_capabilities(dom, spec)
    _qemu_overrides(dom, spec)
    ET.indent(dom, space="  ")
    return ET.tostring(dom, encoding="unicode") + "\n"


def parse_metadata(xml: str) -> dict[str, str]:
    """The dynvm metadata of a domain XML as a dict; {} for a domain without it (a foreign VM)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValidationError(f"domain XML does not parse: {exc}") from exc
    el = root.find(f"metadata/{{{DYNVM_NS}}}{METADATA_ROOT}")
    if el is None:
        return {}
    prefix = f"{{{DYNVM_NS}}}"
    return {
        child.tag[len(prefix) :]: (child.text or "")
        for child in el
        if isinstance(child.tag, str) and child.tag.startswith(prefix)
    }
