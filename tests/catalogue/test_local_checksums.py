"""The shipped catalogue validates on any machine that built the test images: their checksums are not
pinned (``sha256: local``), while a pinned checksum is still checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError as PydanticValidationError

from provisioner.catalogue.checksums import ChecksumCache
from provisioner.catalogue.model import Artefact
from provisioner.catalogue.store import Catalogue, Severity
from tests.catalogue.helpers import IMAGES, make_artefacts


def test_shipped_catalogue_validates_against_locally_built_artefacts(tmp_path: Path) -> None:
    """What `dynvm image validate images/` saw after the QEMU farm built the images: 12 checksum errors."""
    root = tmp_path / "artefacts"
    make_artefacts(root)  # this machine's build: any bytes at all
    _, findings = Catalogue.check(IMAGES, root, ChecksumCache(None))
    assert [str(f) for f in findings] == []


def test_every_shipped_test_artefact_says_it_is_built_locally() -> None:
    cat = Catalogue.load(IMAGES, Path("/nonexistent"), ChecksumCache(None))
    arts = [a for fam in cat.families() for v in fam.versions for a in v.artefacts()]
    assert len(arts) == 12 and all(a.path.startswith("test/") and not a.pinned for a in arts)
    for f in IMAGES.glob("*.yaml"):
        assert "sha256: local" in f.read_text() and "not pinned" in f.read_text(), f


def test_a_pinned_checksum_is_still_checked(tmp_path: Path) -> None:
    cat_dir, root = tmp_path / "cat", tmp_path / "artefacts"
    shutil.copytree(IMAGES, cat_dir, ignore=shutil.ignore_patterns("build"))
    make_artefacts(root)
    se = cat_dir / "se.yaml"
    se.write_text(se.read_text().replace("    sha256: local", f'    sha256: "{"ab" * 32}"', 1))
    _, findings = Catalogue.check(cat_dir, root, ChecksumCache(None))
    (f,) = findings
    assert f.severity is Severity.ERROR and "versions[0].boot.kernel.sha256: checksum mismatch" in f.message
    (root / "test" / "vmlinux").unlink()  # a missing artefact is a warning, pinned or not
    _, findings = Catalogue.check(cat_dir, root, ChecksumCache(None))
    assert {f.severity for f in findings} == {Severity.WARNING} and len(findings) == 6


@pytest.mark.parametrize("value", ["LOCAL", "none", "", "local ", "0" * 63])
def test_only_a_hex_digest_or_local(value: str) -> None:
    with pytest.raises(PydanticValidationError):
        Artefact(path="test/vmlinux", sha256=value)


def test_image_add_keeps_local_and_fills_only_what_is_missing(tmp_path: Path) -> None:
    cat_dir, root = tmp_path / "cat", tmp_path / "artefacts"
    shutil.copytree(IMAGES, cat_dir, ignore=shutil.ignore_patterns("build"))
    make_artefacts(root)
    (root / "alice.img").write_bytes(b"disk")
    src = tmp_path / "alice.yaml"
    src.write_text(
        "name: alice-wn\nkind: worker\nvos: [alice]\nversions:\n  - version: '1'\n"
        "    disk: {path: alice.img}\n    boot: {kernel: {path: test/vmlinux, sha256: local}}\n"
    )
    cat = Catalogue.load(cat_dir, root, ChecksumCache(None))
    cat.add(src)
    spec = cat.resolve("alice-wn:1").spec
    assert spec.boot is not None and not spec.boot.kernel.pinned
    assert spec.disk is not None and spec.disk.pinned and len(spec.disk.sha256) == 64
