"""One test-driver farm for the whole session: a private Redis, three host agents, a control worker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.configload import load_config
from provisioner.control.client import client_runtime
from provisioner.farm.layout import FarmLayout, pid_alive
from provisioner.farm.local import farm_down, farm_up
from provisioner.runtime import Runtime


@dataclass
class Farm:
    layout: FarmLayout
    rt: Runtime
    hold_file: Path

    def env(self) -> dict[str, str]:
        return dict(os.environ, DYNVM_CONFIG=str(self.layout.config_file))


@pytest.fixture(scope="session")
def test_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    base = tmp_path_factory.mktemp("farm")
    hold = base / "hold-boot"
    # The agents read this fault-injection knob (see provisioner.agent.lifecycle._fault_hold).
    os.environ["DYNVM_FAULT_HOLD_AFTER_START"] = str(hold)
    layout = FarmLayout(base)
    try:
        farm_up(layout, 3, "test", host_cpus=8, host_memory_mib=8192)
    finally:
        del os.environ["DYNVM_FAULT_HOLD_AFTER_START"]
    rt = client_runtime(load_config(layout.config_file))
    yield Farm(layout, rt, hold)
    st = layout.read_state()
    assert st is not None
    pids = [*st.children.values(), st.redis_pid, st.supervisor_pid]
    farm_down(layout)
    st2 = layout.read_state()
    assert st2 is None
    left = [p for p in pids if pid_alive(p)]
    assert not left, f"farm down left processes behind: {left}"
