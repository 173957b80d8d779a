"""Catalogue edits keep what the operator wrote (comments, order, quoting); errors point at the right line."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from provisioner import yamlio
from provisioner.catalogue.checksums import ChecksumCache
from provisioner.catalogue.model import ImageFamily
from provisioner.catalogue.store import Catalogue
from provisioner.errors import CatalogueError
from tests.catalogue.helpers import DATA, make_catalogue

COMMENTED = """\
# Operator's header: who owns this family and why it looks like this.
schema_version: 1
name: alice-wn
kind: worker   # one job per VM
vos: [alice]
versions:
  # the first release; keep until 2027
  - version: "1.0"
    boot:
      kernel: {path: test/vmlinux}  # the shared test kernel
      initrd: {path: alice/initrd.gz}
    vcpus: {default: 1, min: 1, max: 4}
channels:
  stable: "1.0"   # moved by the release manager only
"""


@pytest.fixture
def cat(tmp_path: Path) -> Catalogue:
    d, root = make_catalogue(tmp_path)
    (root / "alice").mkdir()
    (root / "alice" / "initrd.gz").write_bytes(b"alice initrd")
    return Catalogue.load(d, root, ChecksumCache(tmp_path / "cache.json"))


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line.rstrip("\n")
        for line in difflib.unified_diff(before.splitlines(True), after.splitlines(True), n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def comments(text: str) -> list[str]:
    return [line[line.index("#") :] for line in text.splitlines() if "#" in line]


def test_promote_changes_one_line_and_keeps_every_comment(cat: Catalogue) -> None:
    cat.add(version_file(cat, "cms-wn", "2026.12.0"))
    path = cat.directory / "cms-wn.yaml"
    before = path.read_text()
    cat.promote("cms-wn", "2026.12.0", "stable")
    after = path.read_text()
    assert changed_lines(before, after) == ['-  stable: "2026.11.0"', '+  stable: "2026.12.0"']
    cat.promote("cms-wn", "2026.12.0", "canary")  # a new channel is appended, nothing else moves
    assert changed_lines(after, path.read_text()) == ['+  canary: "2026.12.0"']


def test_retire_adds_one_line(cat: Catalogue) -> None:
    cat.add(version_file(cat, "wms", "2026.12.0"))
    cat.promote("wms", "2026.12.0", "stable")
    path = cat.directory / "wms.yaml"
    before = path.read_text()
    cat.retire("wms", "2026.11.0")
    assert changed_lines(before, path.read_text()) == ["+    retired: true"]
    assert Catalogue.load(cat.directory, cat.artefact_root, ChecksumCache(None)).family("wms").versions[
        0
    ].retired


def test_add_keeps_the_catalogue_files_and_the_input_files_comments(cat: Catalogue, tmp_path: Path) -> None:
    src = tmp_path / "alice.yaml"
    src.write_text(COMMENTED)
    cat.add(src)
    path = cat.directory / "alice-wn.yaml"
    created = path.read_text()
    assert comments(created) == comments(COMMENTED)
    assert created.index("name: alice-wn") < created.index("versions:") < created.index("channels:")
    # A second version, with its own comment, goes after the first; the file keeps all comments.
    v2 = tmp_path / "alice-2.yaml"
    v2.write_text(
        COMMENTED.replace('"1.0"', '"2.0"').replace("the first release; keep until 2027", "hotfix")
        .split("channels:")[0]
    )
    cat.add(v2)
    text = path.read_text()
    assert [c for c in comments(COMMENTED) if c not in comments(text)] == []
    assert "# hotfix" in text
    fam = Catalogue.load(cat.directory, cat.artefact_root, ChecksumCache(None)).family("alice-wn")
    assert [v.version for v in fam.versions] == ["1.0", "2.0"]
    assert fam.versions[1].created is not None and fam.versions[1].boot is not None
    assert fam.versions[1].boot.initrd is not None and len(fam.versions[1].boot.initrd.sha256) == 64


def test_add_points_at_the_channel_naming_a_missing_version(cat: Catalogue, tmp_path: Path) -> None:
    src = tmp_path / "alice.yaml"
    src.write_text(COMMENTED.replace('stable: "1.0"', 'stable: "9.9"'))
    with pytest.raises(CatalogueError) as ei:
        cat.add(src)
    assert str(ei.value).startswith(f"{src}:14: channels.stable: points at missing version '9.9'")


def test_add_points_at_a_duplicate_version(cat: Catalogue, tmp_path: Path) -> None:
    src = tmp_path / "alice.yaml"
    dup = COMMENTED.split("channels:")[0] + '  - version: "1.0"\n    boot: {kernel: {path: test/vmlinux}}\n'
    src.write_text(dup)
    with pytest.raises(CatalogueError, match=r"alice\.yaml:13: versions\[1\]\.version: duplicate version"):
        cat.add(src)


@pytest.mark.parametrize(
    ("name", "line", "start"),
    [
        ("channel_missing.yaml", 12, "channels.stable: points at missing version '9.9'"),
        ("duplicate_version.yaml", 11, "versions[1].version: duplicate version '1.0'"),
    ],
)
def test_schema_errors_name_their_field_so_any_reader_gets_the_line(name: str, line: int, start: str) -> None:
    """Whoever validates a document with the schema alone (not through the catalogue's precheck) still
    learns the line: the schema's cross-field messages name the field they are about."""
    doc = yamlio.load(DATA / "bad" / name, CatalogueError)
    with pytest.raises(CatalogueError) as ei:
        yamlio.validate_model(doc, ImageFamily, CatalogueError)
    assert yamlio.where(ei.value)[1] == line
    assert start in str(ei.value)


def version_file(cat: Catalogue, family: str, version: str) -> Path:
    text = (cat.directory / f"{family}.yaml").read_text().split("channels:")[0]
    p = cat.directory.parent / f"{family}-{version}.in.yaml"
    p.write_text(text.replace('"2026.11.0"', f'"{version}"', 1))
    return p
