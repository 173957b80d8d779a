"""`dynvm watchdog --host NAME` as a process: one per host (flock), observable, re-armed by pets, stoppable.

The guests it kills are tested in-process (tests/ha/test_watchdog.py) and on real QEMU
(tests/qemu_e2e/test_watchdog.py); here the libvirt test driver only gives it a host to connect to.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ha.watchdog import holder, lock_file, pet, pet_file, read_status, stop_watchdog
from provisioner.agent.fencing import spawn_watchdog
from provisioner.configload import load_config
from provisioner.hypervisor.testdriver import write_test_host_xml
from tests.conftest import wait_until

pytestmark = [pytest.mark.libvirt]


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[Path]:
    uri = write_test_host_xml(tmp_path / "hv1.xml", cpus=4, memory_mib=4096)
    doc = {
        "redis_url": "redis://127.0.0.1:1/0",  # never used by the watchdog
        "domain_type": "test",
        "catalogue_dir": str(tmp_path),
        "detection_classes": {"t": {"lease_ttl_s": 0.5, "dead_after_s": 1.0}},
        "hosts": [{"name": "hv1", "uri": uri, "detection_class": "t"}],
        "ha": {"run_dir": str(tmp_path / "run"), "watchdog_s": 0.5},
    }
    path = tmp_path / "dynvm.yaml"
    path.write_text(yaml.safe_dump(doc))
    yield path
    stop_watchdog(lock_file(tmp_path / "run", "hv1"))


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "provisioner.cli.main", "--config", str(cfg), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_one_watchdog_per_host_observable_rearmed_and_stopped(cfg: Path) -> None:
    config = load_config(cfg)
    run = cfg.parent / "run"
    proc = spawn_watchdog(config, "hv1")
    try:
        wait_until(lambda: holder(lock_file(run, "hv1")) == proc.pid, 30, what="the watchdog's lock")
        # Never petted: it fires after its timeout (counted from its start), and says so in its status.
        wait_until(lambda: (read_status(run, "hv1") or {}).get("fired") == 1, 30, what="fired")
        assert (read_status(run, "hv1") or {}).get("armed") is False
        # A second watchdog for the same host: exit 4, one line, nothing else touched.
        second = _cli(cfg, "watchdog", "--host", "hv1")
        assert second.returncode == 4, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "hv1" in second.stderr
        assert "Traceback" not in second.stderr
        assert holder(lock_file(run, "hv1")) == proc.pid
        # Pets re-arm it: the agent's renewals keep it quiet.
        pet(pet_file(run, "hv1"))
        wait_until(lambda: (read_status(run, "hv1") or {}).get("armed") is True, 10, what="re-armed")
        # Stopped by SIGTERM (farm down): the lock is free, the exit clean.
        assert stop_watchdog(lock_file(run, "hv1"))
        assert proc.wait(timeout=10) == 0
        assert holder(lock_file(run, "hv1")) is None
        # Its log (run/hv1.watchdog.log) says when: each line stamped, as the agents' and monitors' are.
        lines = (run / "hv1.watchdog.log").read_text().splitlines()
        fired = [ln for ln in lines if "no pet for" in ln]
        assert len(fired) == 1 and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ERROR ", fired[0]), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watchdog_exits_when_its_lock_file_is_removed(cfg: Path) -> None:
    run = cfg.parent / "run"
    proc = spawn_watchdog(load_config(cfg), "hv1")
    try:
        wait_until(lambda: holder(lock_file(run, "hv1")) == proc.pid, 30, what="the watchdog's lock")
        lock_file(run, "hv1").unlink()  # a new farm wipes its run dir: a leftover watchdog must go
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watchdog_for_an_unknown_host_exits_3(cfg: Path) -> None:
    r = _cli(cfg, "watchdog", "--host", "nope")
    assert r.returncode == 3 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_watchdog_with_an_unusable_run_dir_exits_5_in_one_line(cfg: Path) -> None:
    blocker = cfg.parent / "blocker"
    blocker.write_text("a file where the run dir's parent should be")
    doc = yaml.safe_load(cfg.read_text())
    doc["ha"]["run_dir"] = str(blocker / "run")
    cfg.write_text(yaml.safe_dump(doc))
    r = _cli(cfg, "watchdog", "--host", "hv1")
    assert r.returncode == 5, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "watchdog hv1" in r.stderr
    assert "Traceback" not in r.stderr
