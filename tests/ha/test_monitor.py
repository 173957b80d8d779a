"""Monitors on the real Redis: one leads, a standby takes over, heartbeats and ``dynvm ha status``."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ha.monitor import Monitor, MonitorSettings
from provisioner.configload import load_config
from provisioner.control.client import client_runtime
from tests.conftest import wait_until

pytestmark = pytest.mark.redis


def test_one_leader_standby_takes_over_and_status_shows_them(cli, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    rt = client_runtime(load_config(Path(os.environ["DYNVM_CONFIG"])))
    settings = MonitorSettings(round_s=0.05, lease_ttl_s=0.5)
    m1, m2 = Monitor(rt, settings, "mon-1"), Monitor(rt, settings, "mon-2")
    stop1, stop2 = threading.Event(), threading.Event()
    t1 = threading.Thread(target=m1.run, args=(stop1,), daemon=True)
    t1.start()
    wait_until(lambda: m1.fence > 0, timeout=5, what="mon-1 to lead")
    t2 = threading.Thread(target=m2.run, args=(stop2,), daemon=True)
    t2.start()
    wait_until(lambda: m2.rounds >= 3, timeout=5, what="mon-2 rounds")
    assert m2.fence == 0
    rc, out, err = cli(capsys, "-o", "json", "ha", "status")
    assert rc == 0, err
    st = json.loads(out)
    assert st["leader"] == "mon-1" and st["paused"] is None
    assert {m["member"]: m["leading"] for m in st["monitors"]} == {"mon-1": True, "mon-2": False}
    stop1.set()  # the leader stops (resigns): the standby leads with a higher fence
    t1.join(timeout=5)
    first = m1.fence
    wait_until(lambda: m2.fence > first, timeout=5, what="mon-2 to take over")
    stop2.set()
    t2.join(timeout=5)
    assert m1.errors == 0 and m2.errors == 0


def test_pause_and_resume(cli, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli(capsys, "ha", "pause", "--reason", "network work")[0] == 0
    rc, out, err = cli(capsys, "-o", "json", "ha", "status")
    assert rc == 0, err
    assert "network work" in json.loads(out)["paused"]
    assert cli(capsys, "ha", "resume")[0] == 0
    _, out, _ = cli(capsys, "-o", "json", "ha", "status")
    assert json.loads(out)["paused"] is None


@pytest.mark.parametrize(
    "argv", [["--round", "nan"], ["--round", "0"], ["--lease", "-1"], ["--lease", "inf"]]
)
def test_monitor_rejects_bad_timings_before_doing_anything(cli, capsys, argv) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = cli(capsys, "monitor", *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1
