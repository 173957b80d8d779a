"""Catalogue edits: immutability, checksums computed by add, promote/retire rules, atomicity, locking."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from provisioner.catalogue import edit
from provisioner.catalogue.checksums import ChecksumCache
from provisioner.catalogue.store import Catalogue
from provisioner.errors import CatalogueError, ConflictError, UnknownImageError, ValidationError
from tests.catalogue.helpers import make_catalogue, sha

NEW_FAMILY = """\
schema_version: 1
name: alice-wn
kind: worker
vos: [alice]
versions:
  - version: "1.0"
    boot:
      kernel: {{path: test/vmlinux{kernel_sha}}}
      initrd: {{path: alice/initrd.gz}}
channels:
  stable: "1.0"
"""


@pytest.fixture
def cat(tmp_path: Path) -> Catalogue:
    d, root = make_catalogue(tmp_path)
    (root / "alice").mkdir()
    (root / "alice" / "initrd.gz").write_bytes(b"alice initrd")
    return Catalogue.load(d, root, ChecksumCache(tmp_path / "cache.json"))


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.endswith(".lock")}


def version_file(cat: Catalogue, family: str, version: str, tweak: str = "") -> Path:
    """A file adding ``version`` to ``family`` (a copy of its current entry with a new version)."""
    text = (cat.directory / f"{family}.yaml").read_text().split("channels:")[0]
    text = text.replace('"2026.11.0"', f'"{version}"', 1)
    if tweak:
        text = text.replace("    exec:", f"{tweak}\n    exec:")
    p = cat.directory.parent / f"{family}-{version}-{len(tweak)}.in.yaml"
    p.write_text(text)
    return p


def test_add_new_family_computes_missing_checksums(cat: Catalogue, tmp_path: Path) -> None:
    src = tmp_path / "alice.yaml"
    src.write_text(NEW_FAMILY.format(kernel_sha=""))
    result = cat.add(src)
    assert result.created and result.added == ["1.0"] and result.name == "alice-wn"
    img = cat.resolve("alice-wn")
    assert img.spec.boot is not None and img.spec.boot.initrd is not None
    assert img.spec.boot.initrd.sha256 == sha(b"alice initrd")
    assert img.spec.boot.kernel.sha256 == sha((cat.artefact_root / "test" / "vmlinux").read_bytes())
    assert img.spec.created is not None and img.spec.created.endswith("Z")
    # The written file is a valid catalogue entry and validates clean.
    again = Catalogue.load(cat.directory, cat.artefact_root, ChecksumCache(None))
    assert again.resolve("alice-wn") == img
    assert again.validate() == []


def test_add_is_idempotent_for_an_identical_version(cat: Catalogue, tmp_path: Path) -> None:
    src = tmp_path / "alice.yaml"
    src.write_text(NEW_FAMILY.format(kernel_sha=""))
    cat.add(src)
    before = snapshot(cat.directory)
    result = cat.add(src)
    assert not result.created and result.added == [] and result.unchanged == ["1.0"]
    assert snapshot(cat.directory) == before


def test_add_new_version_to_existing_family(cat: Catalogue) -> None:
    result = cat.add(version_file(cat, "cms-wn", "2026.12.0"))
    assert result.added == ["2026.12.0"] and not result.created
    assert cat.resolve("cms-wn:2026.12.0").spec.version == "2026.12.0"
    assert cat.resolve("cms-wn").spec.version == "2026.11.0"  # channels do not move on add
    fresh = Catalogue.load(cat.directory, cat.artefact_root, ChecksumCache(None))
    assert [v.version for v in fresh.family("cms-wn").versions] == ["2026.11.0", "2026.12.0"]


def test_version_reused_with_a_different_checksum_is_a_conflict_and_changes_nothing(cat: Catalogue) -> None:
    p = version_file(cat, "cms-wn", "2026.11.0")
    p.write_text(p.read_text().replace(p.read_text().split('sha256: "')[1][:64], "f" * 64, 1))
    before = snapshot(cat.directory)
    with pytest.raises(ConflictError) as ei:
        cat.add(p)
    assert "cms-wn:2026.11.0 already exists" in str(ei.value)
    assert "boot.kernel.sha256" in str(ei.value)
    assert snapshot(cat.directory) == before  # byte-identical, no temp file


def test_version_reused_with_other_content_is_a_conflict(cat: Catalogue) -> None:
    p = version_file(cat, "cms-wn", "2026.11.0", tweak="    health: {type: domain_state}")
    with pytest.raises(ConflictError, match="different health"):
        cat.add(p)


def test_add_refuses_family_level_changes(cat: Catalogue) -> None:
    p = version_file(cat, "cms-wn", "2026.12.0")
    p.write_text(p.read_text().replace("vos: [cms]", "vos: [cms, atlas]"))
    with pytest.raises(ConflictError, match="vos of image 'cms-wn' differs"):
        cat.add(p)


def test_add_refuses_moving_a_channel(cat: Catalogue) -> None:
    p = version_file(cat, "cms-wn", "2026.12.0")
    p.write_text(p.read_text() + 'channels:\n  stable: "2026.12.0"\n')
    before = snapshot(cat.directory)
    with pytest.raises(ConflictError, match=r"already points at '2026\.11\.0'"):
        cat.add(p)
    assert snapshot(cat.directory) == before


def test_add_with_traversal_or_missing_artefact(cat: Catalogue, tmp_path: Path) -> None:
    src = tmp_path / "alice.yaml"
    src.write_text(NEW_FAMILY.format(kernel_sha="").replace("alice/initrd.gz", "../../etc/passwd"))
    before = snapshot(cat.directory)
    with pytest.raises(CatalogueError, match=r"alice\.yaml:9: .*'\.\./\.\./etc/passwd'"):
        cat.add(src)
    (cat.artefact_root / "alice" / "initrd.gz").unlink()
    src.write_text(NEW_FAMILY.format(kernel_sha=""))
    with pytest.raises(CatalogueError, match=r"alice\.yaml:9: versions\[0\]\.boot\.initrd: no sha256 given"):
        cat.add(src)
    (cat.artefact_root / "alice" / "initrd.gz").symlink_to(tmp_path / "cache.json")
    with pytest.raises(CatalogueError, match="outside the artefact root"):
        cat.add(src)
    assert snapshot(cat.directory) == before


def test_add_invalid_file(cat: Catalogue, tmp_path: Path) -> None:
    src = tmp_path / "x.yaml"
    src.write_bytes(b"name: \xff\n")
    with pytest.raises(CatalogueError, match="not valid UTF-8"):
        cat.add(src)


def test_promote_and_retire_rules(cat: Catalogue) -> None:
    cat.add(version_file(cat, "atlas-wn", "2026.12.0"))
    with pytest.raises(ConflictError, match=r"still in channel.*stable"):
        cat.retire("atlas-wn", "2026.11.0")
    fam = cat.promote("atlas-wn", "2026.12.0", "stable")
    assert fam.channels == {"stable": "2026.12.0"}
    fam = cat.retire("atlas-wn", "2026.11.0")
    assert fam.version("2026.11.0") is not None and fam.version("2026.11.0").retired  # type: ignore[union-attr]
    with pytest.raises(ConflictError, match="retired"):
        cat.promote("atlas-wn", "2026.11.0", "testing")
    before = snapshot(cat.directory)
    cat.retire("atlas-wn", "2026.11.0")  # already retired: no-op, no rewrite
    cat.promote("atlas-wn", "2026.12.0", "stable")
    assert snapshot(cat.directory) == before


@pytest.mark.parametrize(
    ("args", "error", "fragment"),
    [
        (("cms-wn", "9.9", "stable"), UnknownImageError, "no version '9.9'"),
        (("nope", "1.0", "stable"), UnknownImageError, "unknown image 'nope'"),
        (("cms-wn", "2026.11.0", "Stable!"), ValidationError, "channel: invalid value 'Stable!'"),
        (("cms-wn", "../x", "stable"), ValidationError, "version: invalid value '../x'"),
        (("../etc", "1.0", "stable"), ValidationError, "'../etc'"),
    ],
)
def test_promote_errors(
    cat: Catalogue, args: tuple[str, str, str], error: type[Exception], fragment: str
) -> None:
    before = snapshot(cat.directory)
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        cat.promote(*args)
    assert snapshot(cat.directory) == before


def test_failed_rename_leaves_file_identical_and_no_temp(
    cat: Catalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat.add(version_file(cat, "se", "2026.12.0"))
    before = snapshot(cat.directory)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        cat.promote("se", "2026.12.0", "stable")
    monkeypatch.undo()
    assert snapshot(cat.directory) == before
    assert not [p for p in cat.directory.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_edits_do_not_lose_each_other(cat: Catalogue) -> None:
    files = [version_file(cat, "wms", f"2027.{i}.0") for i in range(8)]
    errors: list[BaseException] = []

    def worker(p: Path) -> None:
        try:
            # Each thread has its own (stale) in-memory catalogue, like separate operators.
            Catalogue.load(cat.directory, cat.artefact_root, ChecksumCache(None)).add(p)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    fresh = Catalogue.load(cat.directory, cat.artefact_root, ChecksumCache(None))
    assert {v.version for v in fresh.family("wms").versions} == {"2026.11.0"} | {
        f"2027.{i}.0" for i in range(8)
    }


def test_dump_round_trips(cat: Catalogue) -> None:
    for fam in cat.families():
        text = edit.dump(fam)
        p = cat.directory.parent / "rt.yaml"
        p.write_text(text)
        from provisioner.catalogue.files import parse_family

        assert parse_family(p).family == fam
