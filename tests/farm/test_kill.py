"""``dynvm farm kill|revive`` on the test-driver farm (a test:/// host lives in its agent's process: the
agent's death is the host's): the host is kept down, the farm's own monitors fail its service over, a
revived host comes back empty and stays fenced until an operator rejoins it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ha.recovery import RecoveryStore, Step
from provisioner.cli.main import main
from provisioner.configload import load_config
from provisioner.control.client import choose_image, client_runtime, submit, wait
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down
from provisioner.model import HostState, InstanceState
from tests.conftest import wait_until
from tests.farm.conftest import up

pytestmark = [pytest.mark.redis, pytest.mark.libvirt, pytest.mark.slow]


def test_killed_host_stays_down_its_service_fails_over_and_it_rejoins_by_operator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = FarmLayout(tmp_path / "farm")
    try:
        up(layout, hosts=3)
        st = layout.read_state()
        assert st is not None
        assert {"monitor-1", "monitor-2"} <= set(st.children), st.children
        rt = client_runtime(load_config(layout.config_file))
        img, _ = choose_image(rt, "ce", None)
        ce, _ = submit(rt, img, None, service="ce-01", host="hv1")
        assert wait(rt, ce.id, 60).state is InstanceState.READY
        agent_pid = st.children["agent-hv1"]

        d = str(layout.base)
        assert main(["farm", "kill", "hv1", "--dir", d]) == 0
        recs = RecoveryStore(rt.store.r, rt.store.keys.prefix)
        wait_until(
            lambda: (r := recs.get("hv1")) is not None and r.step is Step.CLOSED,
            timeout=60,
            interval=0.1,
            what="hv1's recovery to close (the farm's monitors)",
        )
        moved = rt.store.require_instance(ce.id)
        assert moved.state is InstanceState.READY and moved.host in ("hv2", "hv3"), moved
        after = layout.read_state()
        assert after is not None
        assert "agent-hv1" not in after.children  # kept down: the supervisor did not restart it
        assert after.restarts.get("agent-hv1", 0) == 0
        assert not rt.store.lease_alive("hv1")
        assert rt.store.require_host("hv1").state is HostState.FENCED

        capsys.readouterr()
        assert main(["farm", "revive", "hv1", "--dir", d]) == 0
        revived = layout.read_state()
        assert revived is not None and revived.children["agent-hv1"] != agent_pid
        assert rt.store.require_host("hv1").state is HostState.FENCED  # the operator decides
        assert main(["--config", str(layout.config_file), "host", "rejoin", "hv1"]) == 0
        assert rt.store.require_host("hv1").state is HostState.UP
        # Nothing of the old host came back with it: the service runs once, where it failed over to.
        live = [
            i for i in rt.store.list_instances() if i.service == "ce-01" and i.state is not InstanceState.GONE
        ]
        assert [i.id for i in live] == [ce.id] and live[0].host == moved.host
    finally:
        farm_down(layout)


def test_kill_of_an_unknown_host_or_without_a_farm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["farm", "kill", "hv1", "--dir", str(tmp_path / "none")]) == 5
    assert "no farm is up" in capsys.readouterr().err
    assert main(["farm", "kill", "../x", "--dir", str(tmp_path / "none")]) == 2
