"""The image build: cached by content hash, manifest checksums match the files, catalogue gets them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from provisioner.catalogue.model import ImageFamily
from provisioner.farm.qemu import write_farm_catalogue
from tests.farm_qemu.conftest import CACHE, REPO

pytestmark = pytest.mark.qemu


def test_rebuild_is_a_noop_and_manifest_matches(qemu_images: Path) -> None:
    manifest = json.loads((qemu_images / "manifest.json").read_text())
    before = {rel: (qemu_images / rel).stat().st_mtime_ns for rel in manifest["artefacts"]}
    p = subprocess.run([str(REPO / "images/build/build-test-images.sh"), str(qemu_images)],
                       env={**os.environ, "DYNVM_DEB_CACHE": str(CACHE / "debs")},
                       capture_output=True, text=True, check=True)
    assert "up to date" in p.stderr
    assert {rel: (qemu_images / rel).stat().st_mtime_ns for rel in manifest["artefacts"]} == before
    for rel, art in manifest["artefacts"].items():
        assert hashlib.sha256((qemu_images / rel).read_bytes()).hexdigest() == art["sha256"], rel
    assert (qemu_images / "test/vmlinux").read_bytes()[:4] == b"\x7fELF"  # the PVH vmlinux, not a bzImage


def test_farm_catalogue_gets_real_checksums(qemu_images: Path, tmp_path: Path) -> None:
    manifest = json.loads((qemu_images / "manifest.json").read_text())
    patched = write_farm_catalogue(REPO / "images", qemu_images, qemu_images / "manifest.json", tmp_path)
    assert patched["cms-wn.yaml"] == 2
    fam = ImageFamily.model_validate(yaml.safe_load((tmp_path / "cms-wn.yaml").read_text()))
    boot = fam.versions[0].boot
    assert boot is not None and boot.initrd is not None
    assert boot.kernel.sha256 == manifest["artefacts"]["test/vmlinux"]["sha256"]
    assert boot.initrd.sha256 == manifest["artefacts"]["test/cms-wn.initrd.gz"]["sha256"]
