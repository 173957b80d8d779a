"""One 4-host QEMU farm shared by the HA tests (farm_up(driver="qemu") as the CLI does it, with its two
monitors).  Its own directory under DYNVM_TEST_CACHE; the built test images are taken from the e2e
farm's cache when present (hard links), so no second image build."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.configload import load_config
from provisioner.control.client import client_runtime
from provisioner.farm.layout import FarmLayout, pid_alive
from provisioner.farm.local import farm_down, farm_up
from provisioner.runtime import Runtime

CACHE = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))


@dataclass
class HAFarm:
    layout: FarmLayout
    rt: Runtime

    @property
    def netns(self) -> str:
        ns = self.rt.config.network.probe_netns
        assert ns is not None
        return ns


@pytest.fixture(scope="session")
def hafarm() -> Iterator[HAFarm]:
    if os.geteuid() != 0:
        pytest.fail("the QEMU farm tests need root (deselect them with -m 'not qemu')")
    layout = FarmLayout(CACHE / "ha-farm")
    farm_down(layout)
    for stale in (layout.redis_dir, layout.shared / "run", layout.shared / "instances", layout.catalogue,
                  layout.down_dir):
        shutil.rmtree(stale, ignore_errors=True)
    built = CACHE / "dynvm-farm" / "shared" / "images"
    if built.is_dir() and not (layout.shared / "images").exists():
        layout.shared.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(built), str(layout.shared / "images")], check=True)
    farm_up(layout, 4, "qemu", timeout_s=240)
    rt = client_runtime(load_config(layout.config_file))
    yield HAFarm(layout, rt)
    st = layout.read_state()
    assert st is not None
    pids = [*st.children.values(), st.redis_pid, st.supervisor_pid]
    farm_down(layout)
    assert [p for p in pids if pid_alive(p)] == []
