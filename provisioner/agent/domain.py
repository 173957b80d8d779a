"""From (instance, catalogue image, config) to the files the VM needs and its domain XML."""

from __future__ import annotations

import uuid
from pathlib import Path

from provisioner.catalogue.model import ImageKind, ResolvedImage
from provisioner.config import DomainType
from provisioner.hypervisor.domxml import ChannelSpec, DiskSpec, DomainSpec, NicSpec, build_domain_xml
from provisioner.model import Instance
from provisioner.runtime import Runtime

UUID_NS = uuid.UUID("5d1e0b8e-6f4e-4c1a-9a55-2f3b7c0d9e11")
SERVICE_DATA_DISK_MIB = 64
EXEC_CHANNEL = "org.dynvm.exec.0"


def instance_dir(rt: Runtime, inst: Instance) -> Path:
    """Per-instance run files (serial logs, the exec channel socket), on the shared storage."""
    from provisioner.storage.overlay import overlay_path

    overlay_path(rt.config.storage.overlays, inst.id)  # validates the id
    return rt.config.storage.shared_dir / "run" / inst.id


def serial_log_path(rt: Runtime, inst: Instance, host: str | None = None) -> Path:
    """Per host, so a migrated guest's log does not overwrite the source's while both exist."""
    return instance_dir(rt, inst) / f"console-{host or rt.host}.log"


def exec_socket_path(rt: Runtime, inst: Instance, host: str | None = None) -> Path:
    """Per host: during a live migration source and destination QEMU each listen on their own socket."""
    return instance_dir(rt, inst) / f"exec-{host or inst.host or rt.host}.sock"


def overlay_paths(rt: Runtime, inst: Instance) -> list[Path]:
    from provisioner.storage.overlay import overlay_path

    root = rt.config.storage.overlays
    return [overlay_path(root, inst.id), overlay_path(root, inst.id, "data")]


def remove_instance_files(rt: Runtime, inst: Instance) -> None:
    import shutil

    from provisioner.storage.overlay import remove_overlay

    for path in overlay_paths(rt, inst):
        remove_overlay(path, rt.config.storage.overlays)
    shutil.rmtree(instance_dir(rt, inst), ignore_errors=True)


def instance_disks(rt: Runtime, inst: Instance, image: ResolvedImage) -> list[DiskSpec]:
    """Create (idempotently) the instance's disks on shared storage: a qcow2 overlay over the image's
    disk, and for a service its own data disk.  The catalogue's base image is never written."""
    from provisioner.storage.overlay import create_blank, create_overlay

    instance_dir(rt, inst).mkdir(parents=True, exist_ok=True)
    rt.config.storage.overlays.mkdir(parents=True, exist_ok=True)
    root_disk, data = overlay_paths(rt, inst)
    disks: list[DiskSpec] = []
    if image.spec.disk is not None:
        base = rt.config.storage.artefacts / image.spec.disk.path
        create_overlay(base, image.spec.disk.format.value, root_disk)
        disks.append(DiskSpec(path=str(root_disk), format="qcow2", target="vda"))
    if image.kind is ImageKind.SERVICE and rt.config.domain_type is not DomainType.TEST:
        # ha.share_rw_data_disks (test-only): a raw data disk with share-rw=on, the virtlockd lease its only
        # lock (the file keeps its overlay name, so removal and GC treat it alike).
        fmt = "raw" if rt.config.ha.share_rw_data_disks else "qcow2"
        create_blank(data, SERVICE_DATA_DISK_MIB, fmt)
        disks.append(DiskSpec(path=str(data), format=fmt, target=f"vd{chr(ord('a') + len(disks))}",
                              share_rw=rt.config.ha.share_rw_data_disks))
    return disks


def spec_for(
    rt: Runtime, inst: Instance, image: ResolvedImage, disks: list[DiskSpec], host: str | None = None
) -> str:
    """The domain XML for ``inst`` on ``host`` (default: this agent's host; a migration builds the
    destination's XML with the destination's per-host paths)."""
    host = host or rt.host
    cfg = rt.config
    boot = image.spec.boot
    test = cfg.domain_type is DomainType.TEST
    cmdline = None
    if boot is not None:
        extra = [f"dynvm.id={inst.id}"]
        if inst.ip:
            extra.append(f"dynvm.ip={inst.ip}/{cfg.network.prefix_len}")
        cmdline = " ".join([boot.cmdline, *extra])
    nics: tuple[NicSpec, ...] = ()
    if inst.mac and cfg.network.bridge and not test:
        nics = (NicSpec(mac=inst.mac, bridge=cfg.network.bridge),)
    meta = {"instance_id": inst.id, "role": inst.role.value, "image": inst.image}
    if inst.vo:
        meta["vo"] = inst.vo
    if inst.owner:
        meta["owner"] = inst.owner
    spec = DomainSpec(
        name=inst.domain_name,
        uuid=str(uuid.uuid5(UUID_NS, inst.id)),
        domain_type=cfg.domain_type.value,
        vcpus=inst.vcpus,
        memory_mib=inst.memory_mib,
        kernel=str(cfg.storage.artefacts / boot.kernel.path) if boot else None,
        initrd=str(cfg.storage.artefacts / boot.initrd.path) if boot and boot.initrd else None,
        cmdline=cmdline,
        disks=tuple(disks),
        serial_log=None if test else str(serial_log_path(rt, inst, host)),
        console_pty=not test,
        nics=nics,
        channel=None
        if test or image.spec.exec.method.value != "serial"
        else ChannelSpec(path=str(exec_socket_path(rt, inst, host)), name=EXEC_CHANNEL),
        metadata=meta,
        x86_cpu_readback=not test and cfg.guest_cpu_readback == "x86",
    )
    return build_domain_xml(spec)
