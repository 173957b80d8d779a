"""Monitors on the real Redis: one leads, a standby takes over, heartbeats and ``dynvm ha status``."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ha.engine import Settings
from ha.monitor import Monitor, MonitorSettings
from ha.recovery import RecoveryStore, Step
from provisioner.agent.lease import LeaseKeeper
from provisioner.configload import load_config
from provisioner.control.client import client_runtime
from provisioner.model import Capacity, Host, HostState
from tests.catalogue.helpers import make_catalogue, write_config
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


# ---- a host rejoined right after its revival (issue 10; benchmarks/bench_failover.py's settle()) ----------
def _rejoin_world(tmp_path: Path, redis_url: str) -> tuple[Monitor, Any]:
    """hv1 in a fast class, hv2/hv3 slow enough never to be missed on a loaded machine (each gets a real
    lease keeper).  The monitor is stepped by the test itself (no thread): rounds happen when it says."""
    cat, root = make_catalogue(tmp_path)
    extra = (f"redis_url: {redis_url}\ndetection_classes:\n"
             "  fast: {lease_ttl_s: 1.0, dead_after_s: 2.0, samples: 2}\n"
             "  standard: {lease_ttl_s: 10.0, dead_after_s: 30.0, samples: 2}\n")
    rt = client_runtime(load_config(write_config(tmp_path, cat, root, extra=extra)))
    for h, klass in (("hv1", "fast"), ("hv2", "standard"), ("hv3", "standard")):
        rt.store.register_host(Host(h, "test:///default", capacity=Capacity(4, 4096), detection_class=klass))
    settings = MonitorSettings(round_s=0.05, lease_ttl_s=5.0,
                               engine=Settings(watchdog_s=0.2, safety_margin_s=0.1))
    return Monitor(rt, settings, "mon-rejoin"), rt


def _keeper(rt: Any, host: str, token: str) -> LeaseKeeper:
    ttl = 1.0 if host == "hv1" else 10.0
    assert rt.store.acquire_lease(host, token, ttl) is None  # as an agent starts: the lease first
    k = LeaseKeeper(rt.store, host, token, ttl)
    k.start()
    return k


def step_until(mon: Monitor, cond: Callable[[], bool], what: str) -> None:
    """Monitor rounds, one per poll (every 50 ms), until ``cond``."""
    wait_until(lambda: (mon.step(), cond())[1], timeout=30, interval=0.05, what=what)


def _kill_and_fence_hv1(mon: Monitor, rt: Any, keeper: LeaseKeeper) -> None:
    recs = RecoveryStore(rt.store.r, rt.store.keys.prefix)
    step_until(mon, lambda: mon.fence > 0, "the monitor to lead")
    keeper.close()  # the host dies with its agent: no more renewals, its lease runs out
    step_until(mon, lambda: rt.store.require_host("hv1").state is HostState.FENCED
               and (rec := recs.get("hv1")) is not None and rec.step is Step.CLOSED,
               "hv1 declared dead, fenced, its recovery closed")


def test_a_host_rejoined_before_its_new_agents_first_renewal_is_not_declared_dead_again(
    tmp_path: Path, redis_url: str
) -> None:
    """`farm revive` returns once the new agent holds the lease, and `dynvm host rejoin` needs no more; but
    the agent renews (which stamps last_seen) only after connecting to libvirt and registering — seconds on
    a busy host.  The monitor judged the rejoined host on its last renewal from before its death and
    declared it dead again within `samples` rounds (seen by bench_failover and the fencing-layer tests)."""
    mon, rt = _rejoin_world(tmp_path, redis_url)
    keepers = {h: _keeper(rt, h, f"agent-{h}-1") for h in ("hv1", "hv2", "hv3")}
    try:
        _kill_and_fence_hv1(mon, rt, keepers["hv1"])
        # Revived: the new agent takes the lease (start_agent_runtime: acquire, before anything slow) ...
        assert rt.store.acquire_lease("hv1", "agent-hv1-2", 1.0) is None
        # ... and the operator rejoins it at once (what `dynvm host rejoin` checks: a live lease).
        assert rt.store.lease_alive("hv1")
        rt.store.set_host_state("hv1", HostState.UP, expected=HostState.FENCED, reason="operator rejoin",
                                operator=True)
        mark = rt.store.last_event_id()
        for _ in range(6):  # three times `samples` rounds before the agent's first renewal
            mon.step()
        assert rt.store.require_host("hv1").state is HostState.UP, [
            (e.kind, e.message) for e in rt.store.read_events(count=20, since_id=mark)]
        keepers["hv1"] = _keeper(rt, "hv1", "agent-hv1-2")  # its first renewal, then one each third of a TTL
        step_until(mon, lambda: keepers["hv1"].stats.renewals >= 4, "three more renewals of hv1's lease")
        assert rt.store.require_host("hv1").state is HostState.UP
        evs = rt.store.read_events(count=200, since_id=mark)
        assert [e for e in evs if e.kind == "host_dead"] == []
    finally:
        for k in keepers.values():
            k.close()


def test_a_rejoined_host_whose_agent_never_renews_is_still_declared_dead(
    tmp_path: Path, redis_url: str
) -> None:
    """Its silence counts from its return to watch: past dead_after_s without a renewal it is dead again."""
    mon, rt = _rejoin_world(tmp_path, redis_url)
    keepers = {h: _keeper(rt, h, f"agent-{h}-1") for h in ("hv1", "hv2", "hv3")}
    try:
        _kill_and_fence_hv1(mon, rt, keepers["hv1"])
        assert rt.store.acquire_lease("hv1", "agent-hv1-2", 1.0) is None  # taken, never renewed
        rt.store.set_host_state("hv1", HostState.UP, expected=HostState.FENCED, reason="operator rejoin",
                                operator=True)
        mark = rt.store.last_event_id()

        step_until(mon, lambda: rt.store.require_host("hv1").state in (HostState.DEAD, HostState.FENCED),
                   "hv1 declared dead again")
        assert [e.kind for e in rt.store.read_events(count=200, since_id=mark) if e.kind == "host_dead"] \
            == ["host_dead"]
    finally:
        for k in keepers.values():
            k.close()


# ---- a leader change right after a return to watch (the return is on the host record, not in a leader) ---
def _leave_and_return(mon: Monitor, rt: Any, keeper: LeaseKeeper, via: HostState) -> None:
    """hv1 leaves watch with its agent gone (``via`` maintenance: the operator's, its agent stopped for it;
    ``via`` fenced: it died and was declared dead and fenced), stays away until its last renewal is older
    than its class's dead_after_s (2 s), and the operator brings it back into watch — undrain after a
    maintenance (no lease needed), rejoin after a death (the store's move; `dynvm host rejoin`'s lease
    check is the CLI's) — while its agent has not renewed yet.  The leader sees it back for one round."""
    step_until(mon, lambda: mon.fence > 0, "the monitor to lead")
    if via is HostState.MAINTENANCE:
        rt.store.set_host_state("hv1", via, expected=HostState.UP, reason="maintenance", operator=True)
        keeper.close()
    else:
        _kill_and_fence_hv1(mon, rt, keeper)
    step_until(mon, lambda: _redis_now(rt) - rt.store.require_host("hv1").last_seen > 2.5,
               "hv1's last renewal to be older than its dead_after_s")
    rt.store.set_host_state("hv1", HostState.UP, expected=via, reason="operator back", operator=True)
    mon.step()
    assert rt.store.require_host("hv1").state is HostState.UP


def _redis_now(rt: Any) -> float:
    sec, usec = rt.store.r.time()
    return float(sec) + float(usec) / 1e6


def _hand_over(old: Monitor, new: Monitor) -> None:
    """The leader goes right now (its lease resigned: what a standby finds once a killed leader's lease
    expired) and the standby leads, with a fresh engine."""
    first = old.fence
    assert first > 0 and old.lease.resign(first)
    step_until(new, lambda: new.fence > first, "the standby to lead")


@pytest.mark.parametrize("via", [HostState.MAINTENANCE, HostState.FENCED])
def test_a_new_leader_does_not_declare_a_host_just_back_in_watch_dead(
    tmp_path: Path, redis_url: str, via: HostState
) -> None:
    """The leader that saw hv1 come back judged it from its return; a leader elected right after judged it
    on its renewal from before it left (the return lived in the old leader's memory) and declared it dead
    within `samples` rounds ('up -> dead: lease silent 2.6 s')."""
    mon, rt = _rejoin_world(tmp_path, redis_url)
    standby = Monitor(rt, mon.settings, "mon-standby")
    keepers = {h: _keeper(rt, h, f"agent-{h}-1") for h in ("hv1", "hv2", "hv3")}
    try:
        _leave_and_return(mon, rt, keepers["hv1"], via)
        mark = rt.store.last_event_id()
        _hand_over(mon, standby)
        for _ in range(6):  # three times `samples` rounds before the agent's first renewal
            standby.step()
        evs = rt.store.read_events(count=50, since_id=mark)
        assert rt.store.require_host("hv1").state is HostState.UP, [(e.kind, e.message) for e in evs]
        keepers["hv1"] = _keeper(rt, "hv1", "agent-hv1-2")  # its agent back: renewals from now on
        step_until(standby, lambda: keepers["hv1"].stats.renewals >= 4, "three more renewals of hv1's lease")
        assert rt.store.require_host("hv1").state is HostState.UP
        assert [e for e in rt.store.read_events(count=200, since_id=mark) if e.kind == "host_dead"] == []
        assert standby.errors == 0
    finally:
        for k in keepers.values():
            k.close()


@pytest.mark.parametrize("via", [HostState.MAINTENANCE, HostState.FENCED])
def test_after_a_leader_change_a_host_back_whose_agent_never_renews_is_dead_dead_after_s_after_its_return(
    tmp_path: Path, redis_url: str, via: HostState
) -> None:
    mon, rt = _rejoin_world(tmp_path, redis_url)
    standby = Monitor(rt, mon.settings, "mon-standby")
    keepers = {h: _keeper(rt, h, f"agent-{h}-1") for h in ("hv1", "hv2", "hv3")}
    try:
        _leave_and_return(mon, rt, keepers["hv1"], via)
        back = rt.store.require_host("hv1")
        assert back.watched_since > back.last_seen + 2.5  # the return, stamped from Redis's clock
        mark = rt.store.last_event_id()
        _hand_over(mon, standby)
        step_until(standby, lambda: rt.store.require_host("hv1").state in (HostState.DEAD, HostState.FENCED),
                   "hv1 declared dead again")
        dead = [e for e in rt.store.read_events(count=200, since_id=mark) if e.kind == "host_dead"]
        assert [e.host for e in dead] == ["hv1"]
        at = int(dead[0].id.split("-")[0]) / 1000  # the stream id: Redis's clock, in ms
        assert at >= back.watched_since + 2.0 - 0.001, (at - back.watched_since, dead[0].message)
    finally:
        for k in keepers.values():
            k.close()
