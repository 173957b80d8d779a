"""An agent's loops are observable when they stall (provisioner/agent/loops.py): records on the real Redis,
and what ``dynvm host show`` and ``dynvm ha status`` say."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import redis

from provisioner.agent.loops import (
    LoopRecord,
    late_after_s,
    late_loops,
    loop_fields,
    loop_key,
    read_loops,
)
from provisioner.configload import load_config
from provisioner.control.client import client_runtime
from provisioner.model import Capacity, Host

pytestmark = pytest.mark.redis
PREFIX = "dynvm"


def test_a_record_is_written_at_most_once_a_second_and_read_back(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    rec = LoopRecord(r, PREFIX, "hv1", "reconcile")
    assert rec.write(passes=1, errors=0, last_error="", last_run=1000.0, every_s=5)
    assert not rec.write(passes=2, errors=0, last_error="", last_run=1001.0, every_s=5)  # throttled
    loops = read_loops(r, PREFIX, "hv1")
    assert loops == {"reconcile": {"last_run": "1000.000", "every_s": "5", "passes": "1", "errors": "0",
                                   "last_error": ""}}
    assert 0 < r.ttl(loop_key(PREFIX, "hv1", "reconcile")) <= 86400  # a gone host leaves nothing for long
    fields = loop_fields(loops, now=1012.0)
    assert fields["reconcile_loop_passes"] == "1" and fields["reconcile_loop_age_s"] == "12.0"
    assert read_loops(r, PREFIX, "hv2") == {}
    with pytest.raises(ValueError, match="unknown agent loop"):
        loop_key(PREFIX, "hv1", "nope")


def test_late_means_three_periods_and_ten_seconds_beyond_one() -> None:
    assert late_after_s(0.25) == 10.25 and late_after_s(10) == 30
    loops = {"reconcile": {"last_run": "1000", "every_s": "10"},
             "health": {"last_run": "1025", "every_s": "0.25"},
             "fencing": {"last_run": "1029", "every_s": "0.15"}}
    assert late_loops(loops, now=1030.0) == []
    assert late_loops(loops, now=1040.5) == ["reconcile: no pass for 40 s (every 10 s)",
                                             "health: no pass for 16 s (every 0.25 s)",
                                             "fencing: no pass for 12 s (every 0.15 s)"]
    # A record that cannot be read says nothing (no false alarm from a half-written or foreign hash).
    assert late_loops({"health": {"last_run": "x", "every_s": "1"}, "fencing": {"last_run": "1"}}, 1e9) == []


def test_ha_status_names_a_live_agents_late_loop_and_host_show_prints_them(cli, capsys) -> None:  # type: ignore[no-untyped-def]
    rt = client_runtime(load_config(Path(os.environ["DYNVM_CONFIG"])))
    store = rt.store
    for h in ("hv1", "hv2", "hv3"):
        store.register_host(Host(h, "test:///default", capacity=Capacity(4, 4096)))
    store.renew_lease("hv1", "agent-hv1", 60)
    store.renew_lease("hv2", "agent-hv2", 60)  # hv3: no lease (its agent is gone): its loops say nothing
    now = time.time()
    for host, loop, age in (("hv1", "reconcile", 100.0), ("hv1", "health", 1.0), ("hv2", "health", 0.5),
                            ("hv3", "reconcile", 500.0)):
        LoopRecord(store.r, store.keys.prefix, host, loop).write(
            passes=7, errors=1, last_error="HypervisorTimeout: x", last_run=now - age, every_s=5)
    rc, out, err = cli(capsys, "-o", "json", "ha", "status")
    assert rc == 0, err
    loops = {h["name"]: h["loops"] for h in json.loads(out)["hosts"]}
    assert loops["hv1"].startswith("reconcile: no pass for 10") and "(every 5 s)" in loops["hv1"]
    assert "health" not in loops["hv1"]
    assert loops["hv2"] == "ok" and loops["hv3"] == "-"
    rc, out, err = cli(capsys, "ha", "status")  # the text table carries the column too
    assert rc == 0 and "reconcile: no pass for 10" in out, err
    rc, out, err = cli(capsys, "-o", "json", "host", "show", "hv1")
    assert rc == 0, err
    row = json.loads(out)
    assert row["reconcile_loop_passes"] == "7" and row["reconcile_loop_last_error"] == "HypervisorTimeout: x"
    assert 99 < float(row["reconcile_loop_age_s"]) < 200 and "health_loop_age_s" in row
