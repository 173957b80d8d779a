"""Restarting only an agent is not a host death: a restarted agent takes its dead predecessor's lease over
by compare-and-set (handover_lease.lua) instead of waiting one TTL for it to expire.

Real Redis, real ``dynvm agent`` processes on the libvirt test driver, a lease TTL of 10 s: before the
handover the successor waited ~11 s and the lease was absent meanwhile (the host looked dead).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from provisioner.agent.handover import (
    AgentRecord,
    boot_id,
    own_record,
    predecessor_dead,
    proc_start,
    read_record,
    take_over,
    write_record,
)
from provisioner.config import checkout_images_dir
from provisioner.hypervisor.testdriver import write_test_host_xml
from provisioner.state import StateStore
from tests.conftest import wait_until

pytestmark = [pytest.mark.redis]


def test_handover_lua_is_a_compare_and_set(redis_url: str) -> None:
    store = StateStore(redis_url)
    assert store.acquire_lease("hv1", "old", 10) is None
    assert store.handover_lease("hv1", "old", "new", 10) is None  # the old token held it: handed over
    assert store.lease_holder("hv1") == "new" and store.lease_ttl_ms("hv1") > 9000
    assert store.handover_lease("hv1", "old", "third", 10) == "new"  # not the old token's any more
    assert store.lease_holder("hv1") == "new"
    assert store.handover_lease("hv1", "old", "new", 10) is None  # idempotent for the new holder
    store.drop_lease("hv1")
    assert store.handover_lease("hv1", "old", "fresh", 10) is None  # expired meanwhile: simply taken
    assert store.lease_holder("hv1") == "fresh"


def _fields(pid: int, **kw: object) -> dict[str, object]:
    rec = own_record("hv1", "tok")
    return {
        "host": "hv1",
        "machine": rec.machine,
        "boot_id": boot_id(),
        "pid": pid,
        "start": proc_start(pid) or 0,
        "token": "tok",
    } | kw


def _rec(pid: int, **kw: object) -> AgentRecord:
    return AgentRecord(**_fields(pid, **kw))  # type: ignore[arg-type]


def test_predecessor_dead_only_when_proven() -> None:
    live = subprocess.Popen(["sleep", "30"])
    try:
        assert not predecessor_dead(_rec(live.pid), "hv1")  # alive
        assert not predecessor_dead(_rec(os.getpid()), "hv1")  # ourselves
        assert predecessor_dead(_rec(live.pid, start=1), "hv1")  # same pid, another process (pid reuse)
        assert not predecessor_dead(_rec(live.pid, start=1, host="hv2"), "hv1")  # another host's record
        assert not predecessor_dead(
            _rec(live.pid, start=1, boot_id="0000"), "hv1"
        )  # cannot judge another boot
        assert not predecessor_dead(
            _rec(live.pid, start=1, machine="elsewhere"), "hv1"
        )  # nor another machine
        started = proc_start(live.pid)
    finally:
        live.kill()
        live.wait()
    assert predecessor_dead(_rec(live.pid, start=started), "hv1")  # exited (and reaped)


def test_take_over_from_a_dead_record_only(redis_url: str, tmp_path: Path) -> None:
    store = StateStore(redis_url)
    path = tmp_path / "agent-hv1.json"
    assert not take_over(store, path, "hv1", "new", 10)  # no record
    path.write_text("{not json")
    assert not take_over(store, path, "hv1", "new", 10)  # malformed: nothing to hand over
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_record(path, _rec(gone.pid, start=123, token="old"))
    assert store.acquire_lease("hv1", "old", 10) is None
    assert take_over(store, path, "hv1", "new", 10)
    assert store.lease_holder("hv1") == "new"
    assert [e.kind for e in store.read_events(count=10) if e.host == "hv1"] == ["agent_handover"]
    # A record whose token no longer holds the lease hands nothing over (exit-4 path stays in charge).
    write_record(path, _rec(gone.pid, start=123, token="old"))
    assert not take_over(store, path, "hv1", "newer", 10)
    assert store.lease_holder("hv1") == "new"
    assert read_record(path) is not None


@pytest.fixture
def agent_config(redis_url: str, tmp_path: Path) -> Iterator[Path]:
    uri = write_test_host_xml(tmp_path / "hv1.xml", cpus=8, memory_mib=8192)
    cfg = {
        "redis_url": redis_url,
        "catalogue_dir": str(checkout_images_dir()),
        "domain_type": "test",
        "storage": {"shared_dir": str(tmp_path / "shared")},
        "hosts": [{"name": "hv1", "uri": uri, "detection_class": "slow"}],  # lease TTL 10 s
        "ha": {"run_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "dynvm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    yield path


def _agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "provisioner.cli.main", "--config", str(cfg), "agent", "--host", "hv1"],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def test_restarted_agent_takes_the_lease_over_without_a_gap(agent_config: Path, redis_url: str) -> None:
    store = StateStore(redis_url)
    run = agent_config.parent / "run"
    log = agent_config.parent / "agents.log"
    first = _agent(agent_config, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_until(
            lambda: (run / "agent-hv1.json").exists() and store.lease_holder("hv1") is not None,
            60,
            what=f"the first agent (see {log})",
        )
        old = store.lease_holder("hv1")
        rec = read_record(run / "agent-hv1.json")
        assert rec is not None and rec.pid == first.pid and rec.token == old
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = _agent(agent_config, log)
        holders: list[str | None] = []

        def taken_over() -> bool:  # every sample is kept: a None among them is a lapse
            holders.append(store.lease_holder("hv1"))
            return holders[-1] not in (None, old)

        wait_until(taken_over, 60, what=f"a new lease holder (see {log})")
        new = holders[-1]
        assert None not in holders, "the lease lapsed between the two agents: the host looked dead"
        assert store.lease_ttl_ms("hv1") > 5000
        # The event follows the handover's compare-and-set: wait for it rather than race it.
        wait_until(
            lambda: any(e.kind == "agent_handover" for e in store.read_events(count=100)),
            30,
            what="the agent_handover event",
        )

        def recorded() -> bool:
            rec2 = read_record(run / "agent-hv1.json")
            return rec2 is not None and second is not None and rec2.pid == second.pid and rec2.token == new

        wait_until(recorded, 10, what="the new agent's record")
        assert second.poll() is None
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=20)
