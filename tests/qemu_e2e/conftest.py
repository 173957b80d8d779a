"""One dynvm farm on real QEMU (TCG) for the session: `farm_up(driver="qemu")`, exactly as the CLI does it.

Lives under DYNVM_TEST_CACHE (default /var/cache/dynvm-test) so the hosts' libvirt capability caches and
the built test images survive between runs.
"""

from __future__ import annotations

import os
import shutil
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
class QFarm:
    layout: FarmLayout
    rt: Runtime

    @property
    def netns(self) -> str:
        ns = self.rt.config.network.probe_netns
        assert ns is not None
        return ns


@pytest.fixture(scope="session")
def qfarm() -> Iterator[QFarm]:
    if os.geteuid() != 0:
        pytest.fail("the QEMU farm tests need root (deselect them with -m 'not qemu')")
    layout = FarmLayout(CACHE / "dynvm-farm")
    farm_down(layout)  # a farm left over by an interrupted run
    # Fresh state each session; keep only the built images and the hosts' libvirt caches.
    for stale in (layout.redis_dir, layout.shared / "run", layout.shared / "instances", layout.catalogue):
        shutil.rmtree(stale, ignore_errors=True)
    farm_up(layout, 3, "qemu", timeout_s=180)
    rt = client_runtime(load_config(layout.config_file))
    yield QFarm(layout, rt)
    st = layout.read_state()
    assert st is not None
    pids = [*st.children.values(), st.redis_pid, st.supervisor_pid]
    farm_down(layout)
    assert [p for p in pids if pid_alive(p)] == []
