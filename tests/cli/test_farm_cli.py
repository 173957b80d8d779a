"""Bad arguments to the farm commands: one line, exit 2, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.cli.main import main


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["farm", "up", "--hosts", "0"], "--hosts 0"),
        (["farm", "up", "--hosts", "many"], "--hosts"),
        (["farm", "up", "--driver", "xen"], "xen"),
        (["vm", "provision", "--vo", "cms", "--timeout", "soon"], "--timeout"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main([*argv, *(["--dir", str(tmp_path / "farm")] if argv[:2] == ["farm", "up"] else [])])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "farm" / "farm.json").exists()


def test_farm_status_when_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-o", "json", "farm", "status", "--dir", str(tmp_path)]) == 0
    assert '"up": false' in capsys.readouterr().out
