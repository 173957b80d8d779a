"""The real QEMU farm: per-host libvirtd in namespaces, shared storage, one bridge, virtlockd leases."""

from pathlib import Path

from provisioner.farm.qemu.catalogue import write_farm_catalogue
from provisioner.farm.qemu.farm import QemuFarm, fix_kvm_permissions


def qemu_host_uris(base: Path, hosts: int) -> dict[str, str]:
    """The libvirt URI of every host of the farm rooted at ``base`` (whether or not it is up)."""
    return QemuFarm(base, hosts).host_uris()


__all__ = ["QemuFarm", "fix_kvm_permissions", "qemu_host_uris", "write_farm_catalogue"]
