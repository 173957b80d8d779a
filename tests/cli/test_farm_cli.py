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


@pytest.mark.parametrize("verb", ["up", "down", "status", "kill", "revive"])
@pytest.mark.parametrize("under", ["", "sub/farm"])
def test_a_farm_dir_that_is_not_a_directory_is_named_in_one_line(
    verb: str, under: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by tests/cli/test_fuzz_cli.py: `farm down --dir FIFO` ended in an internal error."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = fifo / under if under else fifo
    argv = ["farm", verb, *(["hv1"] if verb in ("kill", "revive") else []), "--dir", str(target)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{fifo} exists and is not a directory" in err and err.strip().count("\n") == 0, err
    assert fifo.is_fifo()  # left as it was
