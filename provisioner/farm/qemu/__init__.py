"""The real QEMU farm: per-host libvirtd in namespaces, shared storage, one bridge, virtlockd leases."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Protocol

from provisioner.errors import UnavailableError
from provisioner.farm.qemu.catalogue import write_farm_catalogue
from provisioner.farm.qemu.farm import QemuFarm, fix_kvm_permissions

DEB_CACHE = Path(os.environ.get("DYNVM_DEB_CACHE", "/var/cache/dynvm/debs"))


class _Layout(Protocol):
    @property
    def shared(self) -> Path: ...

    @property
    def catalogue(self) -> Path: ...


def qemu_host_uris(base: Path, hosts: int) -> dict[str, str]:
    """The libvirt URI of every host of the farm rooted at ``base`` (whether or not it is up)."""
    return QemuFarm(base, hosts).host_uris()


def prepare_farm_catalogue(layout: _Layout, images_src: Path | None = None) -> None:
    """Build the test images into <shared>/images (cached) and write the catalogue with their checksums."""
    from provisioner.config import checkout_images_dir

    src = images_src or checkout_images_dir()
    artefacts = layout.shared / "images"
    script = src / "build" / "build-test-images.sh"
    p = subprocess.run([str(script), str(artefacts)], env={**os.environ, "DYNVM_DEB_CACHE": str(DEB_CACHE)},
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise UnavailableError(f"{script}: image build failed: {p.stderr.strip().splitlines()[-1:]}")
    write_farm_catalogue(src, artefacts, artefacts / "manifest.json", layout.catalogue)


__all__ = ["QemuFarm", "fix_kvm_permissions", "prepare_farm_catalogue", "qemu_host_uris",
           "write_farm_catalogue"]
