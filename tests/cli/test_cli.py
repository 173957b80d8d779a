"""The dynvm CLI, in-process through main(argv) and once or twice through the installed script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from provisioner.cli import main as main_mod
from provisioner.cli.main import main
from tests.catalogue.helpers import IMAGES, make_catalogue, write_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config with a private catalogue whose artefacts exist and match; returns the catalogue dir."""
    cat, root = make_catalogue(tmp_path)
    monkeypatch.setenv("DYNVM_CONFIG", str(write_config(tmp_path, cat, root)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return cat


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    return lines[0]


# -- image -------------------------------------------------------------------------------------------------
def test_image_list_table_and_json(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "image", "list")
    assert rc == 0 and "cms-wn" in out and "stable=2026.11.0" in out and "critical" in out
    rc, out, _ = run(capsys, "image", "list", "-o", "json")
    rows = json.loads(out)
    assert rc == 0 and [r["name"] for r in rows] == ["atlas-wn", "ce", "cms-wn", "lhcb-wn", "se", "wms"]
    assert rows[0]["kind"] == "worker" and rows[1]["priority"] == "critical"


def test_global_options_before_and_after_the_command(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(Path(str(env)).parent / "dynvm.yaml")
    for argv in (
        ["-o", "json", "image", "show", "se"],
        ["image", "-o", "json", "show", "se"],
        ["image", "show", "se", "--output=json"],
        ["--config", cfg, "image", "show", "se", "-o", "json"],
        ["image", "show", "se", "--config", cfg, "-ojson"],
    ):
        rc, out, _ = run(capsys, *argv)
        assert rc == 0, argv
        assert json.loads(out)["ref"] == "se:2026.11.0", argv


def test_image_show(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "-o", "json", "image", "show", "cms-wn:testing")
    obj = json.loads(out)
    assert rc == 0 and obj["ref"] == "cms-wn:2026.11.0" and obj["channels"] == ["stable", "testing"]
    assert obj["readiness"]["type"] == "serial_marker" and obj["vcpus"]["max"] == 8
    rc, out, _ = run(capsys, "image", "show", "wms")
    assert rc == 0 and "ha.start_after" in out and "se" in out


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["image", "show", "nope"], 3, "dynvm: error: unknown image 'nope'"),
        (["image", "show", "cms-wn:nightly"], 3, "no version or channel 'nightly'"),
        (["image", "show", "cms-wn;reboot"], 2, "'cms-wn;reboot'"),
        (["image", "show"], 2, "the following arguments are required: REF"),
        (["image", "promote", "cms-wn", "2026.11.0"], 2, "--channel"),
        (["image", "promote", "cms-wn", "9.9", "--channel", "stable"], 3, "no version '9.9'"),
        (["image", "retire", "cms-wn", "2026.11.0"], 4, "still in channel(s) stable, testing"),
        (["image", "frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["image", "list", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["-o", "yaml", "image", "list"], 2, "invalid choice: 'yaml'"),
        (["vo", "resolve", "alice"], 3, "unknown VO 'alice'"),
        (
            ["vo", "resolve", "cms;rm -rf /"],
            2,
            "vo: value 'cms;rm -rf /' contains the forbidden character ';'",
        ),
        (["vo", "resolve", "<cms/>"], 2, "forbidden character '<'"),
        (["vo", "resolve", "cms", "--image", "atlas-wn"], 2, "does not serve VO 'cms'"),
        (["nosuchgroup"], 2, "invalid choice"),
    ],
)
def test_errors_are_one_line_with_documented_exit_codes(
    env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, fragment: str
) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == code, err
    line = one_line(err)
    assert line.startswith("dynvm: error: ") and fragment in line, line
    assert out == ""
    assert "Traceback" not in err


def test_errors_in_json_mode(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "-o", "json", "image", "show", "nope")
    assert rc == 3 and out == ""
    assert json.loads(one_line(err)) == {
        "error": {"code": "unknown_image", "message": json.loads(one_line(err))["error"]["message"]}
    }
    assert "nope" in json.loads(err)["error"]["message"]
    rc, _, err = run(capsys, "image", "show", "--output", "json")  # a usage error, still JSON
    assert rc == 2 and json.loads(one_line(err))["error"]["code"] == "invalid"


def test_add_promote_retire_cycle(env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "in.yaml"
    text = (env / "lhcb-wn.yaml").read_text().split("channels:")[0].replace('"2026.11.0"', '"2026.12.0"', 1)
    new.write_text(text)
    rc, out, _ = run(capsys, "image", "add", str(new))
    assert rc == 0 and "added version(s): 2026.12.0" in out
    rc, out, _ = run(capsys, "-o", "json", "image", "promote", "lhcb-wn", "2026.12.0", "--channel", "stable")
    assert rc == 0 and json.loads(out)["channels"] == {"stable": "2026.12.0"}
    rc, out, _ = run(capsys, "image", "retire", "lhcb-wn", "2026.11.0")
    assert rc == 0 and "retired lhcb-wn:2026.11.0" in out
    rc, out, _ = run(capsys, "-o", "json", "vo", "resolve", "lhcb")
    assert rc == 0 and json.loads(out)["image"] == "lhcb-wn:2026.12.0"
    rc, out, _ = run(capsys, "-o", "json", "image", "list")
    (row,) = [r for r in json.loads(out) if r["name"] == "lhcb-wn"]
    assert row["versions"] == ["2026.12.0"] and row["retired"] == ["2026.11.0"]


def test_add_conflict_leaves_the_catalogue_untouched(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.read_bytes() for p in env.iterdir() if p.suffix == ".yaml"}
    bad = tmp_path / "in.yaml"
    bad.write_text((env / "se.yaml").read_text().replace("max: 4096", "max: 8192"))
    rc, _, err = run(capsys, "image", "add", str(bad))
    assert rc == 4 and "se:2026.11.0 already exists" in one_line(err) and "memory_mib.max" in err
    assert {p.name: p.read_bytes() for p in env.iterdir() if not p.name.endswith(".lock")} == before


def test_add_malformed_file_names_file_and_line(
    tmp_path: Path, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: worker\nvos: [cms\n")
    rc, _, err = run(capsys, "image", "add", str(bad))
    assert rc == 2 and one_line(err).startswith(f"dynvm: error: {bad}:4: malformed YAML")


def test_validate(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "image", "validate")
    assert rc == 0 and "OK: 6 families, 6 versions, 0 error(s), 0 warning(s)" in out
    empty = env.parent / "no-artefacts"
    empty.mkdir()
    rc, out, _ = run(capsys, "image", "validate", str(IMAGES), "--artefact-root", str(empty))
    assert rc == 0 and "missing artefact" in out and "0 error(s), 12 warning(s)" in out
    (env.parent / "artefacts" / "test" / "vmlinux").write_bytes(b"evil")
    rc, out, _ = run(capsys, "image", "validate")
    assert rc == 2 and "checksum mismatch" in out and "FAILED" in out
    rc, out, _ = run(capsys, "-o", "json", "image", "validate")
    findings = json.loads(out)
    assert rc == 2 and len(findings) == 6 and {f["severity"] for f in findings} == {"error"}
    assert all(isinstance(f["line"], int) for f in findings)


def test_validate_reports_every_bad_file(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (env / "ce.yaml").write_text("name: ce\nkind: service\nversions: [\n")
    (env / "se.yaml").write_bytes(b"name: \xff\n")
    rc, out, _ = run(capsys, "image", "validate")
    assert rc == 2
    assert f"{env / 'ce.yaml'}:4: error: malformed YAML" in out
    assert f"{env / 'se.yaml'}:1: error: not valid UTF-8" in out


def test_empty_catalogue_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    cfg = write_config(tmp_path, tmp_path / "empty", tmp_path)
    rc, _, err = run(capsys, "--config", str(cfg), "image", "list")
    assert rc == 2 and "empty catalogue" in one_line(err) and str(tmp_path / "empty") in err


def test_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "dynvm.yaml"
    cfg.write_text("hosts:\n  - name: a\n    uri: qemu:///system\n    colour: red\n")
    rc, _, err = run(capsys, "--config", str(cfg), "vo", "list")
    assert (
        rc == 2 and one_line(err) == f"dynvm: error: {cfg}:4: hosts[0].colour: unknown key (not allowed here)"
    )


def test_vo_list_and_resolve(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "vo", "list", "-o", "json")
    rows = {r["vo"]: r for r in json.loads(out)}
    assert (
        rc == 0 and rows["cms"]["resolves_to"] == "cms-wn:2026.11.0" and rows["atlas"]["groups"] == ["atlas"]
    )
    rc, out, _ = run(capsys, "vo", "resolve", "atlas")
    assert rc == 0 and "atlas-wn:2026.11.0" in out and "unix_group" in out
    rc, out, _ = run(capsys, "-o", "json", "vo", "resolve", "cms", "--image", "cms-wn:testing")
    assert rc == 0 and json.loads(out)["image"] == "cms-wn:2026.11.0"


def test_embedded_default_is_used_without_any_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DYNVM_CONFIG", raising=False)
    monkeypatch.setenv("DYNVM_FARM_DIR", str(tmp_path / "farm"))
    monkeypatch.setattr("provisioner.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    rc, out, _ = run(capsys, "-o", "json", "vo", "list")
    assert rc == 0 and {r["vo"] for r in json.loads(out)} == {"cms", "atlas", "lhcb"}


# -- main() itself -----------------------------------------------------------------------------------------
def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "exit codes:" in out and "3  not found" in out and "130 interrupted" in out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys)
    assert rc == 2 and "usage: dynvm" in err
    rc, _, err = run(capsys, "image")
    assert rc == 2 and "usage: dynvm image" in err


@pytest.fixture
def boom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main_mod, "GROUPS", [*main_mod.GROUPS, "tests.cli.boom_group", "no_such_group_yet"])


def test_unexpected_exception_is_one_line_exit_1(
    boom: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DYNVM_DEBUG", raising=False)
    rc, _, err = run(capsys, "boom", "crash")
    assert rc == 1 and one_line(err).startswith("dynvm: internal error: RuntimeError: something broke")
    monkeypatch.setenv("DYNVM_DEBUG", "1")
    rc, _, err = run(capsys, "boom", "crash")
    assert rc == 1 and "Traceback" in err


def test_ctrl_c_exits_130(boom: None, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "boom", "interrupt")
    assert rc == 130 and one_line(err) == "dynvm: interrupted"


def test_stream_lines(boom: None, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "-o", "json", "boom", "stream")
    lines = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and lines == [{"i": i, "at": "2026-11-24T01:02:03Z", "colour": "red"} for i in range(2)]
    rc, out, _ = run(capsys, "boom", "stream")
    assert out.splitlines()[1] == "i=1 at=2026-11-24T01:02:03Z colour=red"


# -- the installed console script ----------------------------------------------------------------------------
DYNVM = REPO / ".venv" / "bin" / "dynvm"


@pytest.mark.skipif(not DYNVM.exists(), reason="dynvm is not installed in .venv (pip install -e .)")
def test_console_script(env: Path) -> None:
    ok = subprocess.run(
        [str(DYNVM), "image", "list", "-o", "json"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 6
    bad = subprocess.run([str(DYNVM), "vo", "resolve", "alice"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and bad.stdout == ""
    assert bad.stderr == "dynvm: error: unknown VO 'alice' (configured: atlas, cms, lhcb)\n"


def test_module_entry_point(env: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "provisioner.cli.main", "image", "validate", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_validate_checks_the_configured_vos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cat, root = make_catalogue(tmp_path)
    cfg = write_config(tmp_path, cat, root)
    cfg.write_text(cfg.read_text().replace("lhcb: {image: lhcb-wn", "lhcb: {image: cms-wn"))
    rc, out, _ = run(capsys, "--config", str(cfg), "image", "validate")
    assert rc == 2 and f"{cfg}: error: vos.lhcb.image: " in out and "does not serve VO 'lhcb'" in out
