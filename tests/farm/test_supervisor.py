"""The supervisor tells the truth: a start-up death is reported at once with its reason, its own Redis is
restarted after a crash, its restart loop outlives any failure and shows it in `farm status`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from provisioner.cli.main import main
from provisioner.errors import ConflictError, UnavailableError
from provisioner.farm.layout import FarmLayout, FarmState
from provisioner.farm.local import farm_down, farm_status, farm_up
from provisioner.state.store import StateStore
from tests.conftest import wait_until
from tests.farm.conftest import up


def _state(layout: FarmLayout) -> FarmState:
    st = layout.read_state()
    assert st is not None
    return st


def test_start_up_death_is_reported_with_its_reason(
    layout: FarmLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A redis-server that cannot start (as `ip netns` failing would stop a QEMU farm's start-up).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: tested failure'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with pytest.raises(UnavailableError) as exc:
        farm_up(layout, 1, "test", timeout_s=30)
    msg = str(exc.value)
    assert msg.startswith("farm supervisor exited: redis-server did not start: FATAL CONFIG FILE ERROR"), msg
    assert "\n" not in msg
    assert layout.read_state() is None  # cleaned up


def test_redis_crash_is_restarted_with_its_data(running: FarmLayout) -> None:
    before = _state(running)
    assert before.redis_pid is not None
    os.kill(before.redis_pid, signal.SIGKILL)
    wait_until(
        lambda: farm_status(running)["redis"]["answers"] and _state(running).restarts.get("redis", 0) >= 1,
        timeout=30,
        what="the farm's Redis to be restarted",
    )
    after = _state(running)
    assert after.redis_pid != before.redis_pid and after.ours("redis", after.redis_pid)
    store = StateStore.from_url(after.redis_url)
    assert [h.name for h in store.list_hosts()] == ["hv1"]  # the AOF brought the state back
    wait_until(lambda: farm_status(running)["healthy"], timeout=30, what="the farm to be healthy again")
    assert farm_status(running)["redis"]["restarts"] >= 1


def _agent_up(layout: FarmLayout) -> bool:
    st = _state(layout)
    return st.ours("agent-hv1", st.children.get("agent-hv1"))


def test_restart_loop_survives_a_failing_spawn(running: FarmLayout) -> None:
    wait_until(lambda: _agent_up(running), timeout=30, what="agent-hv1 to run")
    st = _state(running)
    log = running.logs / "agent-hv1.log"
    log.rename(running.logs / "agent-hv1.log.old")
    log.mkdir()  # the next spawn of agent-hv1 cannot open its log: IsADirectoryError
    try:
        os.kill(st.children["agent-hv1"], signal.SIGKILL)
        wait_until(
            lambda: "agent-hv1 did not start" in farm_status(running).get("last_error", ""),
            timeout=30,
            what="the failed restart to be reported",
        )
        assert _state(running).supervisor_up()
    finally:
        log.rmdir()
    wait_until(lambda: _agent_up(running), timeout=30, what="agent-hv1 to be started again")
    assert _state(running).restarts["agent-hv1"] >= 2
    assert farm_status(running)["processes"]["agent-hv1"]["alive"]


def test_redis_url_on_a_running_farm_is_a_conflict(
    running: FarmLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    st = _state(running)
    with pytest.raises(ConflictError, match="--redis-url"):
        up(running, redis_url="redis://127.0.0.1:1/0")
    capsys.readouterr()
    argv = ["farm", "up", "--hosts", "1", "--dir", str(running.base)]
    assert main([*argv, "--redis-url", "redis://127.0.0.1:1/0"]) == 4
    assert "farm down" in capsys.readouterr().err
    # The same farm asked for again: returned unchanged, and it says so.
    assert main(["-o", "json", *argv]) == 0
    assert '"already_running": true' in capsys.readouterr().out
    assert _state(running).supervisor_pid == st.supervisor_pid
    # Another farm on a Redis that already holds dynvm state: refused, that state is not ours to wipe.
    other = FarmLayout(tmp_path / "other")
    try:
        with pytest.raises(ConflictError, match="already holds dynvm state"):
            up(other, redis_url=st.redis_url)
        assert other.read_state() is None
    finally:
        farm_down(other)
