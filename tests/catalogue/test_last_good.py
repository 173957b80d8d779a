"""One bad catalogue file: its family keeps its last good version, every other family is unaffected, and
the bad file is reported (CLI warning, `image validate`, `status`, a `catalogue_problem` event)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from provisioner.catalogue.checksums import ChecksumCache
from provisioner.catalogue.lastgood import LastGood
from provisioner.catalogue.store import Catalogue, Severity
from provisioner.cli.main import main
from provisioner.configload import load_config
from provisioner.errors import UnknownImageError
from provisioner.runtime import Runtime, resolve_image
from provisioner.state.store import StateStore
from tests.catalogue.helpers import make_catalogue, write_config

BROKEN = "schema_version: 1\nname: cms-wn\nkind: worker\nvos: [cms\n"  # unterminated flow sequence


def break_file(path: Path, text: str = BROKEN) -> None:
    """Replace a file atomically, as `image add` and most editors do (a rename changes the dir's mtime)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_bad_file_keeps_its_familys_last_good_version_and_spares_the_others(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    lg = LastGood(tmp_path / "last-good")
    first = Catalogue.load_serving(d, root, checksums=ChecksumCache(None), last_good=lg)
    assert first.problems == []
    break_file(d / "cms-wn.yaml")
    # A fresh process (no previous catalogue in memory): the on-disk last good copy serves cms-wn.
    cat = Catalogue.load_serving(d, root, checksums=ChecksumCache(None), last_good=lg)
    assert [f.name for f in cat.families()] == ["atlas-wn", "ce", "cms-wn", "lhcb-wn", "se", "wms"]
    assert cat.resolve("cms-wn").spec == first.resolve("cms-wn").spec
    assert cat.resolve("atlas-wn").spec == first.resolve("atlas-wn").spec
    (p,) = cat.problems
    assert p.severity is Severity.ERROR and p.file == str(d / "cms-wn.yaml") and p.line == 5
    assert "malformed YAML" in p.message and "serving the last good version of 'cms-wn'" in p.message
    # Fixed again: the new good text is served and becomes the last good copy.
    break_file(d / "cms-wn.yaml", (first.entry("cms-wn").text).replace("testing:", "canary:"))
    fixed = Catalogue.load_serving(d, root, checksums=ChecksumCache(None), last_good=lg)
    assert fixed.problems == [] and "canary" in fixed.family("cms-wn").channels
    break_file(d / "cms-wn.yaml")
    again = Catalogue.load_serving(d, root, checksums=ChecksumCache(None), last_good=lg)
    assert "canary" in again.family("cms-wn").channels


def test_no_last_good_version_known_only_that_family_is_missing(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    break_file(d / "cms-wn.yaml")
    cat = Catalogue.load_serving(d, root, checksums=ChecksumCache(None), last_good=LastGood(None))
    with pytest.raises(UnknownImageError, match=r"image 'cms-wn' is not served: .*cms-wn\.yaml:5 is invalid"):
        cat.resolve("cms-wn")
    assert cat.resolve("lhcb-wn").name == "lhcb-wn"
    (p,) = cat.problems
    assert "cms-wn.yaml is not served" in p.message


def test_previous_catalogue_in_memory_serves_when_there_is_no_copy_on_disk(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    none = LastGood(None)
    first = Catalogue.load_serving(d, root, checksums=ChecksumCache(None), last_good=none)
    break_file(d / "se.yaml")
    cat = Catalogue.load_serving(d, root, previous=first, checksums=ChecksumCache(None), last_good=none)
    assert cat.resolve("se").spec == first.resolve("se").spec and len(cat.problems) == 1


def test_a_damaged_or_foreign_last_good_copy_is_ignored(tmp_path: Path) -> None:
    d, root = make_catalogue(tmp_path)
    lg = LastGood(tmp_path / "last-good")
    Catalogue.load_serving(d, root, checksums=ChecksumCache(None), last_good=lg)
    (copy,) = [p for p in (tmp_path / "last-good").rglob("cms-wn.yaml")]
    copy.write_text("name: [\n")
    assert lg.recall(d, "cms-wn") is None
    copy.write_text((d / "atlas-wn.yaml").read_text())  # a valid file of another family
    assert lg.recall(d, "cms-wn") is None


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cat, root = make_catalogue(tmp_path)
    monkeypatch.setenv("DYNVM_CONFIG", str(write_config(tmp_path, cat, root)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return cat


def test_cli_serves_the_last_good_catalogue_and_warns(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "list"]) == 0  # seen good once (by any dynvm process of this user)
    capsys.readouterr()
    break_file(env / "cms-wn.yaml")
    rc = main(["-o", "json", "image", "list"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert [r["name"] for r in json.loads(out)] == ["atlas-wn", "ce", "cms-wn", "lhcb-wn", "se", "wms"]
    (warning,) = err.splitlines()  # long paths may be cut by the CLI's line limit: check the parts
    assert warning.startswith("dynvm: warning: catalogue: ") and "malformed YAML" in warning
    assert "serving the last good version of 'cms-wn'" in warning
    assert main(["image", "show", "atlas-wn"]) == 0
    capsys.readouterr()
    rc = main(["image", "validate"])
    out, _ = capsys.readouterr()
    assert rc == 2 and f"{env / 'cms-wn.yaml'}:5: error: malformed YAML" in out
    assert "serves the last good version of 'cms-wn'" in out


@pytest.mark.redis
def test_agent_keeps_booting_and_reports_the_bad_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d, root = make_catalogue(tmp_path)
    cfg = load_config(write_config(tmp_path, d, root, extra=f"redis_url: {redis_url}\n"))
    store = StateStore.from_url(redis_url)
    rt = Runtime(config=cfg, store=store, catalogue=Catalogue.load_serving(d, root), host="hv1")
    assert resolve_image(rt, "cms-wn").spec.version == "2026.11.0"
    break_file(d / "cms-wn.yaml")  # VMs of every VO keep booting meanwhile
    assert resolve_image(rt, "atlas-wn").name == "atlas-wn"
    assert resolve_image(rt, "cms-wn:2026.11.0").name == "cms-wn"
    # Written in place (no rename) is noticed too.
    (d / "se.yaml").write_text("name: se\n")
    assert resolve_image(rt, "ce").name == "ce"
    assert resolve_image(rt, "se").name == "se"
    events = [e for e in store.read_events(count=100) if e.kind == "catalogue_problem"]
    assert sorted(Path(e.extra["file"]).name for e in events) == ["cms-wn.yaml", "se.yaml"]
    assert all(e.host == "hv1" for e in events)


@pytest.mark.redis
def test_status_shows_the_bad_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d, root = make_catalogue(tmp_path)
    cfg = write_config(tmp_path, d, root, extra=f"redis_url: {redis_url}\n")
    monkeypatch.setenv("DYNVM_CONFIG", str(cfg))
    assert main(["-o", "json", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["catalogue"] == "ok"
    break_file(d / "wms.yaml")
    assert main(["-o", "json", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert f"{d / 'wms.yaml'}:" in status["catalogue"] and "last good version of 'wms'" in status["catalogue"]
