"""``dynvm host fence|maintenance`` on a 2-host test-driver farm: the fence command is an argument vector
(the host name appended), its failure changes nothing, success (or --manual) marks the host fenced by
compare-and-set; maintenance disarms HA (the farm's monitors leave a silent host in maintenance alone)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from provisioner.cli.main import main
from provisioner.configload import load_config
from provisioner.control.client import client_runtime
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down
from provisioner.model import HostState
from provisioner.runtime import Runtime
from tests.conftest import wait_until
from tests.farm.conftest import up

pytestmark = [pytest.mark.redis, pytest.mark.libvirt, pytest.mark.slow]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FarmLayout, Runtime]]:
    layout = FarmLayout(tmp_path_factory.mktemp("fence") / "farm")
    up(layout, hosts=2)
    yield layout, client_runtime(load_config(layout.config_file))
    farm_down(layout)


def _config_with_fence(layout: FarmLayout, tmp: Path, argv: list[str]) -> str:
    cfg = yaml.safe_load(layout.config_file.read_text())
    for h in cfg["hosts"]:
        h["fence_command"] = argv
    path = tmp / "fence.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_fence_runs_the_command_and_marks_the_host_fenced(
    farm: tuple[FarmLayout, Runtime], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout, rt = farm
    plain = str(layout.config_file)
    assert main(["--config", plain, "host", "fence", "hv2"]) == 2  # no command, no --manual
    assert "--manual" in capsys.readouterr().err
    failing = _config_with_fence(layout, tmp_path, ["/bin/sh", "-c", "exit 3", "fence"])
    assert main(["--config", failing, "host", "fence", "hv2"]) == 5
    assert rt.store.require_host("hv2").state is HostState.UP  # a failed fence changes nothing
    witness = tmp_path / "fenced"
    ok = _config_with_fence(layout, tmp_path, ["/bin/sh", "-c", f'echo "$1" > {witness}', "fence"])
    assert main(["--config", ok, "host", "fence", "hv2"]) == 0
    assert witness.read_text().strip() == "hv2"  # the host name is the appended argument
    assert rt.store.require_host("hv2").state is HostState.FENCED
    kinds = [e.kind for e in rt.store.read_events(count=50) if e.host == "hv2"]
    assert "fence_failed" in kinds and "fenced" in kinds and kinds[-1] == "host_fenced"
    assert main(["--config", plain, "host", "rejoin", "hv2"]) == 0
    assert main(["--config", plain, "host", "fence", "hv2", "--manual"]) == 0
    assert rt.store.require_host("hv2").state is HostState.FENCED
    assert main(["--config", plain, "host", "rejoin", "hv2"]) == 0
    assert main(["--config", plain, "host", "fence", "nosuch", "--manual"]) == 3


def test_maintenance_disarms_ha(farm: tuple[FarmLayout, Runtime]) -> None:
    layout, rt = farm
    plain = str(layout.config_file)
    assert main(["--config", plain, "host", "maintenance", "hv1"]) == 0
    assert rt.store.require_host("hv1").state is HostState.MAINTENANCE
    assert main(["--config", plain, "farm", "kill", "hv1", "--dir", str(layout.base)]) == 0
    # Its lease expires; the monitors look at it for longer than its class allows and do nothing.
    wait_until(lambda: not rt.store.lease_alive("hv1"), timeout=30, what="hv1's lease to expire")
    dc = rt.config.detection_classes["fast"]
    deadline_id = rt.store.last_event_id()
    wait_until(
        lambda: _silent_for(rt, "hv1") > 3 * dc.dead_after_s,
        timeout=60, interval=0.2, what="hv1 silent for three detection periods",
    )
    assert rt.store.require_host("hv1").state is HostState.MAINTENANCE
    assert [e.kind for e in rt.store.read_events(count=1000, since_id=deadline_id) if e.host == "hv1"
            and e.kind in ("host_dead", "recovery_fenced")] == []
    assert main(["--config", plain, "farm", "revive", "hv1", "--dir", str(layout.base)]) == 0
    assert main(["--config", plain, "host", "undrain", "hv1"]) == 0


def _silent_for(rt: Runtime, host: str) -> float:
    sec, usec = rt.store.r.time()
    return sec + usec / 1e6 - rt.store.require_host(host).last_seen
