"""The watcher on the test-driver farm (real agents, control worker, Redis) with canned squeue outputs through
a real subprocess: pending jobs raise a VO's pool before they start, a prolog takes a warm VM of its own VO
(never another's), idle VMs fall back to zero after the idle timeout, leaked job VMs are reclaimed (job gone
without an epilog, or past walltime + grace), and the loop survives a failing squeue and records it."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_hooks.context import JobContext
from batch_hooks.demand import SlurmSource
from batch_hooks.pools import PoolSettings
from batch_hooks.server import prolog
from batch_hooks.watcher import cycle, pool_state, run, status_key
from provisioner.config import PoolsConfig
from provisioner.model import InstanceState, Tier
from provisioner.runtime import Runtime
from tests.conftest import wait_until
from tests.control.conftest import Farm


@pytest.fixture()
def pool_rt(test_farm: Farm) -> Iterator[Runtime]:
    base = test_farm.rt
    pools = PoolsConfig(batch="slurm", cluster="c1", reclaim_grace_s=0)
    cfg = base.config.model_copy(update={"pools": pools})
    rt = dataclasses.replace(base, config=cfg)
    yield rt
    from provisioner.control.client import release

    for inst in rt.store.list_instances():  # nothing of ours may be left for other tests to take
        if (inst.vo == "cms" and inst.tier is Tier.POOL) or (inst.owner or "").startswith("slurm:c1:"):
            release(rt, inst.id)
    r, p = rt.store.r, rt.store.keys.prefix
    r.delete(f"{p}:pool:cms", f"{p}:poolvms:cms", f"{p}:pools", status_key(p))


def squeue(tmp_path: Path, text: str) -> SlurmSource:
    out = tmp_path / "out.txt"
    out.write_text(text)
    script = tmp_path / "squeue"
    script.write_text(f"#!/bin/sh\ncat {out}\n")
    script.chmod(0o755)
    return SlurmSource(squeue=str(script))


def pool(rt: Runtime, state: InstanceState | None = None) -> list[str]:
    return sorted(i.id for i in rt.store.list_instances() if i.tier is Tier.POOL and i.owner is None
                  and i.vo == "cms" and (state is None or i.state is state))


def job(uid: int, user: str, job_id: str) -> JobContext:
    return JobContext("slurm", "c1", job_id, 0, user, uid, uid)


def test_pool_rises_serves_a_job_falls_to_zero_and_leaks_are_reclaimed(
        pool_rt: Runtime, pool_uids: dict[str, int], tmp_path: Path) -> None:
    rt = pool_rt
    cms, atlas = pool_uids["cms001"], pool_uids["atlas001"]
    pool_state(rt).set_settings("cms", PoolSettings(0, 3, 1.0), None)
    pending = "".join(f"{j}|PENDING|cms001|{cms}|1:00:00\n" for j in range(101, 106))
    rep = cycle(rt, squeue(tmp_path, pending))
    assert rep.pending == {"cms": 5} and rep.started == {"cms": 3}
    wait_until(lambda: len(pool(rt, InstanceState.READY)) == 3, 30, what="3 warm cms VMs")
    assert cycle(rt, squeue(tmp_path, pending)).started == {}  # warm enough: nothing more

    warm = set(pool(rt))
    got = prolog(rt, job(cms, "cms001", "101"), time.monotonic() + 30)
    assert got["instance"] in warm  # a warm-pool hit
    rec = rt.store.get_instance(got["instance"])
    assert rec is not None and (rec.owner, rec.tier) == ("slurm:c1:101", Tier.WORKER)
    got2 = prolog(rt, job(cms, "cms001", "102"), time.monotonic() + 30)
    assert got2["instance"] in warm and got2["instance"] != got["instance"]
    other = prolog(rt, job(atlas, "atlas001", "900"), time.monotonic() + 30)
    assert other["instance"] not in warm  # never another VO's warm VM: atlas gets a cold one
    assert prolog(rt, job(cms, "cms001", "101"), time.monotonic() + 30)["instance"] == got["instance"]

    # The queue drains: 101 runs with a 1 s walltime, 102 was scancelled without an epilog.
    running = f"101|RUNNING|cms001|{cms}|0:01\n900|RUNNING|atlas001|{atlas}|1:00:00\n"
    src = squeue(tmp_path, running)

    def settled() -> bool:
        cycle(rt, src)
        return not pool(rt) and all(
            (i := rt.store.get_instance(v)) is None or i.state in (InstanceState.STOPPING, InstanceState.GONE)
            for v in (got["instance"], got2["instance"]))

    wait_until(settled, 30, interval=0.5, what="pool back to zero and both job VMs reclaimed")
    kinds = {(e.kind, e.instance) for e in rt.store.read_events(500)}
    assert ("reclaimed", got["instance"]) in kinds and ("reclaimed", got2["instance"]) in kinds
    assert any(k == "pool_release" for k, _ in kinds)
    other_rec = rt.store.get_instance(other["instance"])
    assert other_rec is not None and other_rec.state is InstanceState.READY  # its job runs: kept


def test_loop_survives_a_failing_squeue_and_shows_its_last_run(pool_rt: Runtime, tmp_path: Path) -> None:
    rt = pool_rt
    script = tmp_path / "squeue"
    down = "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2"
    script.write_text(f"#!/bin/sh\n{down}\nexit 1\n")
    script.chmod(0o755)
    stop = threading.Event()
    t = threading.Thread(target=run, args=(rt, SlurmSource(squeue=str(script)), stop, 0.05), daemon=True)
    t.start()
    key = status_key(rt.store.keys.prefix)
    try:
        wait_until(lambda: int(rt.store.r.hget(key, "errors") or 0) >= 3, 20, what="three failed cycles")
        assert "Unable to contact slurm controller" in str(rt.store.r.hget(key, "last_error"))
        script.write_text("#!/bin/sh\nexit 0\n")  # squeue answers again: the same loop recovers
        wait_until(lambda: int(rt.store.r.hget(key, "cycles") or 0) >= 1, 20, what="a good cycle")
        wait_until(lambda: rt.store.r.hget(key, "last_error") == "", 20, what="the error cleared")
        assert t.is_alive()
    finally:
        stop.set()
        t.join(timeout=10)
