"""Operators can see what happened: agent and worker log one line per operation (issue 11).

Before, their logs held Celery's banner only.  Now every event is also a log line (StateStore.add_event ->
provisioner.oplog) with the operation, instance, host, VO and duration, at INFO; failures at ERROR with the
cause; ``--log-format json`` gives one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from provisioner import oplog
from provisioner.state.store import StateStore
from tests.catalogue.helpers import make_catalogue, write_config
from tests.conftest import wait_until

DB = 13  # a database of the session Redis no other test uses


def _record(kind: str, message: str = "", **fields: object) -> logging.LogRecord:
    got: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    h = Grab(level=logging.DEBUG)
    oplog.log.addHandler(h)
    oplog.log.setLevel(logging.DEBUG)
    try:
        oplog.event(kind, message, **fields)  # type: ignore[arg-type]
    finally:
        oplog.log.removeHandler(h)
    assert len(got) == 1
    return got[0]


def test_text_line_names_operation_instance_host_vo_and_duration() -> None:
    rec = _record(
        "ready", "cms-wn:1 ready in 812 ms", instance="ab12", host="hv1", vo="cms", duration_s=0.8123
    )
    line = oplog.TextFormatter().format(rec)
    assert "\n" not in line and rec.levelno == logging.INFO
    assert " INFO op=ready instance=ab12 host=hv1 vo=cms duration_ms=812 cms-wn:1 ready in 812 ms" in line


def test_json_line_and_failure_level() -> None:
    rec = _record("failed", "no capacity: no host for x\namong 3", instance="x", vo="atlas", duration_s=1.5)
    obj = json.loads(oplog.JsonFormatter().format(rec))
    assert rec.levelno == logging.ERROR
    assert obj["op"] == "failed" and obj["instance"] == "x" and obj["vo"] == "atlas"
    assert obj["duration_ms"] == 1500 and obj["level"] == "error"
    assert obj["message"] == "no capacity: no host for x among 3"  # the cause, on one line
    assert _record("orphan_destroyed", "domain d had no live record").levelno == logging.WARNING


def test_an_event_that_cannot_be_logged_is_reported_not_raised_nor_dropped_silently() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no str")

    rec = _record("ready", "x", extra={"bad": Unprintable()})  # the one record: the failure, not the line
    assert rec.levelno == logging.ERROR and rec.getMessage() == "operation log: cannot log a ready event"
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], RuntimeError)


def test_a_cli_process_prints_no_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """No handler configured (a CLI command): an ERROR operation must not reach stderr by the last resort."""
    oplog.event("failed", "boom", instance="x")
    assert capsys.readouterr().err == ""


@pytest.mark.redis
def test_every_event_is_a_log_line(redis_server: str, caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore.from_url(redis_server.rsplit("/", 1)[0] + f"/{DB}")
    caplog.set_level(logging.INFO, logger=oplog.LOGGER)
    store.add_event("placed", "ce:1 on hv2", instance="i1", host="hv2", vo="cms", duration_s=0.25)
    rec = [r for r in caplog.records if r.name == oplog.LOGGER][-1]
    assert rec.dynvm == {"op": "placed", "instance": "i1", "host": "hv2", "vo": "cms", "duration_ms": 250}  # type: ignore[attr-defined]
    ev = store.read_events(count=1)[-1]
    assert ev.kind == "placed" and ev.extra == {"vo": "cms", "duration_ms": "250"}
    store.r.flushdb()


# -- real daemons ------------------------------------------------------------------------------------------
@pytest.fixture
def daemons(tmp_path: Path, redis_server: str) -> Iterator[tuple[Path, dict[str, Path]]]:
    """A worker and an agent (test driver), both with --log-format json; yields (config, {name: log})."""
    from provisioner.hypervisor.testdriver import write_test_host_xml

    url = redis_server.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    cat, root = make_catalogue(tmp_path)
    uri = write_test_host_xml(tmp_path / "hv1.xml", 8, 8192)
    cfg = write_config(
        tmp_path, cat, root, extra=f"redis_url: {url}\nhosts:\n  - {{name: hv1, uri: '{uri}'}}\n"
    )
    env = dict(os.environ, DYNVM_CONFIG=str(cfg))
    logs = {"worker": tmp_path / "worker.log", "agent": tmp_path / "agent.log"}
    argv = {"worker": ["worker"], "agent": ["agent", "--host", "hv1"]}
    procs = []
    for name, path in logs.items():
        with path.open("w") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "provisioner.cli.main", *argv[name], "--log-format", "json"],
                    stdout=subprocess.DEVNULL,
                    stderr=f,
                    env=env,
                )
            )
    try:
        yield cfg, logs
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        redis.Redis.from_url(url).flushdb()


def _ops(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            obj = json.loads(line)  # every JSON line parses: one object per line
            if "op" in obj:
                out.append(obj)
    return out


@pytest.mark.redis
@pytest.mark.libvirt
def test_agent_and_worker_log_each_operation_as_json(daemons: tuple[Path, dict[str, Path]]) -> None:
    cfg, logs = daemons
    env = dict(os.environ, DYNVM_CONFIG=str(cfg))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "provisioner.cli.main", "-o", "json", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    wait_until(lambda: cli("host", "list").stdout.count('"alive"') == 1, 60, 0.2, what="agent up")
    r = cli("vm", "provision", "--vo", "cms", "--wait", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    iid = json.loads(r.stdout)["id"]
    r = cli("vm", "release", iid, "--wait", "--timeout", "60")
    assert r.returncode == 0, r.stderr

    def seen(name: str, op: str) -> dict[str, object] | None:
        return next((o for o in _ops(logs[name]) if o["op"] == op and o.get("instance") == iid), None)

    placed = wait_until(lambda: seen("worker", "placed"), 10, what="worker's 'placed' line")
    assert placed["host"] == "hv1" and placed["vo"] == "cms" and isinstance(placed["duration_ms"], int)
    for op in ("boot", "ready", "released"):
        line = wait_until(lambda op=op: seen("agent", op), 10, what=f"agent's {op!r} line")
        assert line["host"] == "hv1" and line["vo"] == "cms" and isinstance(line["duration_ms"], int), line
        assert line["level"] == "info"
