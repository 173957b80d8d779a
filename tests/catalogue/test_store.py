"""Loading, resolving and validating the catalogue; every bad file gives one located error."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import pytest

from provisioner.catalogue.checksums import ChecksumCache
from provisioner.catalogue.files import parse_family, parse_ref
from provisioner.catalogue.model import ImageKind
from provisioner.catalogue.store import Catalogue, Severity
from provisioner.errors import CatalogueError, UnknownImageError, ValidationError
from tests.catalogue.helpers import DATA, IMAGES, make_catalogue

BAD = DATA / "bad"


@pytest.fixture
def cat(tmp_path: Path) -> Catalogue:
    d, root = make_catalogue(tmp_path)
    return Catalogue.load(d, root, ChecksumCache(tmp_path / "cache.json"))


def test_shipped_catalogue_loads_with_the_six_families() -> None:
    c = Catalogue.load(IMAGES, Path("/nonexistent"), ChecksumCache(None))
    assert [f.name for f in c.families()] == ["atlas-wn", "ce", "cms-wn", "lhcb-wn", "se", "wms"]
    for vo in ("cms", "atlas", "lhcb"):
        (fam,) = c.worker_images_for_vo(vo)
        assert fam.name == f"{vo}-wn" and fam.kind is ImageKind.WORKER
        img = c.resolve(fam.name)
        assert img.spec.vcpus.default == 1 and img.spec.vcpus.max == 8
        assert img.spec.memory_mib.default == 256 and img.spec.memory_mib.max == 16384
        assert img.spec.readiness.marker == f"DYNVM_READY {vo}-wn"
    ce, se, wms = (c.resolve(n) for n in ("ce", "se", "wms"))
    assert (
        ce.ha
        and ce.ha.priority == "critical"
        and ce.ha.detection_class == "fast"
        and ce.ha.anti_affinity == "ce"
    )
    assert se.ha and se.ha.priority == "critical"
    assert wms.ha and wms.ha.priority == "high" and wms.ha.start_after == ["se"]
    assert c.worker_images_for_vo("alice") == []


def test_shipped_catalogue_validates_with_missing_artefact_warnings_only(tmp_path: Path) -> None:
    c = Catalogue.load(IMAGES, tmp_path, ChecksumCache(None))
    findings = c.validate()
    assert findings and all(f.severity is Severity.WARNING for f in findings)
    assert all("missing artefact" in f.message and f.line for f in findings)


def test_loading_ten_files_is_cheap(tmp_path: Path) -> None:
    # Not a timing assertion: the figure is in benchmarks; this checks the loader keeps nothing global.
    d, root = make_catalogue(tmp_path)
    a = Catalogue.load(d, root)
    b = Catalogue.load(d, root)
    assert a.families() == b.families() and a is not b


def test_resolve_refs(cat: Catalogue) -> None:
    assert cat.resolve("cms-wn").ref == "cms-wn:2026.11.0"
    assert cat.resolve("cms-wn:stable").ref == "cms-wn:2026.11.0"
    assert cat.resolve("cms-wn:testing").ref == "cms-wn:2026.11.0"
    assert cat.resolve("cms-wn:2026.11.0").spec.version == "2026.11.0"
    assert cat.channels_of("cms-wn", "2026.11.0") == ["stable", "testing"]


@pytest.mark.parametrize(
    ("ref", "error", "fragment"),
    [
        ("alice-wn", UnknownImageError, "unknown image 'alice-wn'"),
        ("cms-wn:nightly", UnknownImageError, "no version or channel 'nightly'"),
        ("atlas-wn:testing", UnknownImageError, "no version or channel 'testing'"),
        ("cms-wn;reboot", ValidationError, "'cms-wn;reboot'"),
        ("CMS", ValidationError, "'CMS'"),
        ("cms-wn:", ValidationError, "'cms-wn:'"),
        ("a:b:c", ValidationError, "'a:b:c'"),
        ("x" * 500, ValidationError, "..."),
    ],
)
def test_resolve_errors(cat: Catalogue, ref: str, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as ei:
        cat.resolve(ref)
    assert fragment in str(ei.value)
    assert len(str(ei.value)) < 200


def test_parse_ref() -> None:
    assert parse_ref("cms-wn") == ("cms-wn", None)
    assert parse_ref("cms-wn:2026.11.0") == ("cms-wn", "2026.11.0")


def test_retired_version_resolves_only_by_exact_version_when_allowed(cat: Catalogue) -> None:
    cat.add(_new_version_file(cat, "2026.12.0"))
    cat.promote("lhcb-wn", "2026.12.0", "stable")
    cat.retire("lhcb-wn", "2026.11.0")
    assert cat.resolve("lhcb-wn").ref == "lhcb-wn:2026.12.0"
    with pytest.raises(UnknownImageError, match="retired"):
        cat.resolve("lhcb-wn:2026.11.0")
    assert cat.resolve("lhcb-wn:2026.11.0", allow_retired=True).spec.retired


def _new_version_file(cat: Catalogue, version: str) -> Path:
    src = (cat.directory / "lhcb-wn.yaml").read_text()
    text = src.replace('"2026.11.0"', f'"{version}"', 1).split("channels:")[0]
    p = cat.directory.parent / f"lhcb-{version}.in"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("name", "line", "fragment"),
    [
        ("malformed.yaml", 5, "malformed YAML"),
        ("unknown_key.yaml", 13, "colour: unknown key"),
        ("wrong_type.yaml", 11, "versions[0].vcpus.default: Input should be a valid integer"),
        ("duplicate_version.yaml", 11, "versions[1].version: duplicate version '1.0'"),
        ("channel_missing.yaml", 12, "channels.stable: points at missing version '9.9'"),
        ("traversal.yaml", 9, "versions[0].boot.kernel.path: artefact path '../../etc/passwd'"),
        ("absolute.yaml", 9, "artefact path '/etc/passwd' must be a non-empty relative path"),
        ("duplicate_key.yaml", 4, "kind: duplicate key 'kind' (first at line 3)"),
        ("not_mapping.yaml", 1, "top level must be a mapping, got list"),
        ("empty.yaml", None, "empty file"),
        ("bad_vo.yaml", 4, "vos[0]: String should match pattern"),
        ("xml_vo.yaml", 4, "(got '<cms/>')"),
        ("bad_sha.yaml", 10, "versions[0].boot.kernel.sha256: String should match pattern"),
        ("missing_kind.yaml", 1, "kind: required key is missing"),
        ("bad_cmdline.yaml", 11, "versions[0].boot.cmdline: cmdline may only contain"),
    ],
)
def test_bad_files(name: str, line: int | None, fragment: str) -> None:
    path = BAD / name
    with pytest.raises(CatalogueError) as ei:
        parse_family(path)
    msg = str(ei.value)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert msg.startswith(prefix), msg
    assert fragment in msg, msg
    assert "\n" not in msg
    assert pickle.loads(pickle.dumps(ei.value)).message == msg


def test_bad_vo_value_is_named() -> None:
    with pytest.raises(CatalogueError, match=r"'cms;rm -rf /'"):
        parse_family(BAD / "bad_vo.yaml")


def test_non_utf8_file_in_catalogue(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    raw = (d / "se.yaml").read_bytes().replace(b"Storage element", b"Storage \xe9l\xe9ment")
    (d / "se.yaml").write_bytes(raw)
    with pytest.raises(CatalogueError) as ei:
        Catalogue.load(d, root)
    assert f"{d / 'se.yaml'}:" in str(ei.value) and "not valid UTF-8 at byte offset" in str(ei.value)


def test_empty_and_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("not yaml")
    with pytest.raises(CatalogueError, match="empty catalogue") as ei:
        Catalogue.load(tmp_path / "empty", tmp_path)
    assert str(tmp_path / "empty") in str(ei.value)
    with pytest.raises(CatalogueError, match="does not exist"):
        Catalogue.load(tmp_path / "absent", tmp_path)


def test_file_name_must_match_family_name(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    (d / "se.yaml").rename(d / "storage.yaml")
    with pytest.raises(CatalogueError) as ei:
        Catalogue.load(d, root)
    assert str(ei.value).startswith(f"{d / 'storage.yaml'}:")
    assert "must live in a file named se.yaml" in str(ei.value)


def test_duplicate_family_names_across_files_name_both(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    shutil.copy(d / "se.yaml", d / "se-copy.yaml")
    with pytest.raises(CatalogueError) as ei:
        Catalogue.load(d, root)
    assert str(d / "se-copy.yaml") in str(ei.value) and str(d / "se.yaml") in str(ei.value)


def test_several_bad_files_are_counted(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    (d / "ce.yaml").write_text("name: [\n")
    (d / "se.yaml").write_text("- 1\n")
    with pytest.raises(CatalogueError, match=r"ce\.yaml:2: .*and 1 more problem"):
        Catalogue.load(d, root)
    _, findings = Catalogue.check(d, root, ChecksumCache(None))
    errors = [f for f in findings if f.severity is Severity.ERROR]
    assert {Path(f.file).name for f in errors} == {"ce.yaml", "se.yaml"}


def test_validate_clean_catalogue_has_no_findings(cat: Catalogue) -> None:
    assert cat.validate() == []


def test_validate_wrong_checksum_is_an_error_with_line(cat: Catalogue) -> None:
    art = cat.artefact_root / "test" / "se.initrd.gz"
    art.write_bytes(b"tampered")
    findings = cat.validate()
    assert len(findings) == 1
    (f,) = findings
    assert f.severity is Severity.ERROR and f.file.endswith("se.yaml")
    assert "versions[0].boot.initrd.sha256: checksum mismatch" in f.message
    lines = Path(f.file).read_text().splitlines()
    assert f.line is not None and "sha256" in lines[f.line - 1]


def test_validate_missing_artefact_is_a_warning(cat: Catalogue) -> None:
    (cat.artefact_root / "test" / "ce.initrd.gz").unlink()
    (f,) = cat.validate()
    assert f.severity is Severity.WARNING and "missing artefact" in f.message and f.file.endswith("ce.yaml")


def test_validate_symlink_escaping_the_root_is_an_error(cat: Catalogue, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"x")
    target = cat.artefact_root / "test" / "wms.initrd.gz"
    target.unlink()
    target.symlink_to(outside)
    (f,) = cat.validate()
    assert f.severity is Severity.ERROR and "outside the artefact root" in f.message


def test_validate_channel_on_retired_version_is_an_error(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    text = (d / "se.yaml").read_text().replace("    exec:", "    retired: true\n    exec:")
    (d / "se.yaml").write_text(text)
    c = Catalogue.load(d, root, ChecksumCache(None))
    errors = [f for f in c.validate() if f.severity is Severity.ERROR]
    assert len(errors) == 1 and "channels.stable: points at retired version" in errors[0].message
    with pytest.raises(UnknownImageError, match="retired"):
        c.resolve("se")


def test_checksum_cache_avoids_rehashing_until_the_file_changes(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    cache_file = tmp_path / "cache.json"
    first = ChecksumCache(cache_file)
    assert Catalogue.load(d, root, first).validate() == []
    assert first.hashed_bytes > 0
    second = ChecksumCache(cache_file)  # a new process would start like this
    assert Catalogue.load(d, root, second).validate() == []
    assert second.hashed_bytes == 0
    art = root / "test" / "ce.initrd.gz"
    art.write_bytes(b"changed!")
    future = time.time() + 5
    os.utime(art, (future, future))
    third = ChecksumCache(cache_file)
    findings = Catalogue.load(d, root, third).validate()
    assert third.hashed_bytes == len(b"changed!")
    assert [f.severity for f in findings] == [Severity.ERROR]


def test_check_single_file(tmp_path: Path) -> None:
    _, findings = Catalogue.check(BAD / "traversal.yaml", tmp_path, ChecksumCache(None))
    assert len(findings) == 1 and findings[0].line == 9 and "'../../etc/passwd'" in findings[0].message
    _, findings = Catalogue.check(IMAGES / "ce.yaml", tmp_path, ChecksumCache(None))
    assert findings and all(f.severity is Severity.WARNING for f in findings)
