"""Farm directories and the no-configuration case, through the CLI as a user types them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from provisioner.cli.main import main
from provisioner.config import DEFAULT_CONFIG_PATH
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down


def test_relative_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    layout = FarmLayout(tmp_path / "myfarm")
    try:
        assert main(["farm", "up", "--hosts", "1", "--dir", "myfarm", "--timeout", "60"]) == 0
        cfg = yaml.safe_load(layout.config_file.read_text())
        assert cfg["catalogue_dir"] == str(tmp_path / "myfarm" / "shared" / "catalogue")
        assert main(["farm", "down", "--dir", "myfarm"]) == 0
        assert layout.read_state() is None
    finally:
        farm_down(layout)


@pytest.mark.parametrize("cmd", ["up", "down", "status"])
def test_empty_dir_is_refused(
    cmd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["farm", cmd, "--dir", ""]) == 2
        err = capsys.readouterr().err
        assert "--dir" in err and "empty" in err and err.strip().count("\n") == 0, err
        assert list(tmp_path.iterdir()) == []  # nothing started, nothing written here
    finally:
        farm_down(FarmLayout(tmp_path))  # what the old code started in "."


@pytest.mark.parametrize(
    "argv", [["host", "list"], ["vm", "provision", "--vo", "cms"], ["vm", "list"], ["status"]]
)
def test_no_config_and_no_farm_says_so(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")
    monkeypatch.delenv("DYNVM_CONFIG", raising=False)
    monkeypatch.setenv("DYNVM_FARM_DIR", str(tmp_path / "nofarm"))
    assert main(argv) == 5
    err = capsys.readouterr().err
    assert "no dynvm configuration" in err and "farm up" in err and err.strip().count("\n") == 0, err


def test_commands_without_redis_still_work_without_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DYNVM_CONFIG", raising=False)
    monkeypatch.setenv("DYNVM_FARM_DIR", str(tmp_path / "nofarm"))
    assert main(["image", "list"]) == 0
