"""Fixtures for the HA tests: a CLI runner on a private catalogue and the session's real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.cli.main import main
from tests.catalogue.helpers import make_catalogue, write_config


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    cat, root = make_catalogue(tmp_path)
    cfg = write_config(tmp_path, cat, root, extra=f"redis_url: {redis_url}\n")
    monkeypatch.setenv("DYNVM_CONFIG", str(cfg))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return run
