"""Farms of our own, each in a temporary directory (never the default farm dir): test driver, small hosts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up


def up(layout: FarmLayout, hosts: int = 1, **kw: object) -> None:
    farm_up(layout, hosts, "test", host_cpus=4, host_memory_mib=8192, timeout_s=60, **kw)  # type: ignore[arg-type]


@pytest.fixture()
def layout(tmp_path: Path) -> Iterator[FarmLayout]:
    """A farm directory; whatever farm a test left up in it is brought down afterwards."""
    lay = FarmLayout(tmp_path / "farm")
    yield lay
    farm_down(lay)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmLayout]:
    """One 1-host farm shared by a module's tests (they may restart its processes, not stop it)."""
    lay = FarmLayout(tmp_path_factory.mktemp("farm"))
    up(lay)
    yield lay
    farm_down(lay)
