"""The demand watcher as a daemon (batch_hooks.watcher.serve, started by every control worker with
``pools.batch`` set): one holder of the farm's watcher lease runs cycles, the others stand by and take over
when the lease is dropped or expires (real Redis, real worker processes killed with SIGKILL); a batch read
that never answers (a hung squeue, a silent HTCondor collector) is cut off, recorded naming its source, and
the pools keep their VMs; the lost-VM requeue loop records its passes; ``dynvm status`` shows both, STALLED
when the last run is old.  No sleeps: every wait is a condition with a deadline."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from batch_hooks.demand import CondorSource, JobSource, Reading, SlurmSource
from batch_hooks.pools import PoolSettings
from batch_hooks.watcher import (
    STALL_CYCLES,
    ReadFailed,
    WatcherLease,
    cycle,
    describe,
    lease_key,
    one_cycle,
    pool_state,
    record,
    serve,
    status_key,
)
from provisioner.config import PoolsConfig
from provisioner.errors import ConflictError, DeadlineExceeded, UnavailableError
from provisioner.model import InstanceState, Tier
from provisioner.runtime import Runtime
from tests.batch_hooks.slurm_cluster import SlurmCluster
from tests.conftest import wait_until
from tests.control.conftest import Farm

DYNVM = Path(sys.executable).parent / "dynvm"


def _cleanup(rt: Runtime) -> None:
    from provisioner.control.client import release

    r, p = rt.store.r, rt.store.keys.prefix
    if r.exists(f"{p}:pool:cms"):
        pool_state(rt).set_settings("cms", PoolSettings(0, 0, 0), None)
    for inst in rt.store.list_instances():
        if (
            inst.tier is Tier.POOL
            and inst.owner is None
            and inst.vo == "cms"
            and inst.state
            in (InstanceState.REQUESTED, InstanceState.PLACED, InstanceState.BOOTING, InstanceState.READY)
        ):
            release(rt, inst.id)
    r.delete(f"{p}:pool:cms", f"{p}:poolvms:cms", f"{p}:pools", status_key(p), lease_key(p), f"{p}:requeue")


@pytest.fixture()
def pool_rt(test_farm: Farm) -> Iterator[Runtime]:
    pools = PoolsConfig(batch="slurm", cluster="c1", watch_interval_s=0.05, watcher_lease_s=1.0)
    rt = dataclasses.replace(test_farm.rt, config=test_farm.rt.config.model_copy(update={"pools": pools}))
    _cleanup(rt)
    yield rt
    _cleanup(rt)


def script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


class Counted:
    """A real squeue (a script printing an empty queue) that counts who reads and how many read at once."""

    name = "slurm"

    def __init__(self, inner: JobSource, tally: dict[str, int], lock: threading.Lock, who: str) -> None:
        self.inner, self.tally, self.lock, self.who = inner, tally, lock, who

    def read(self) -> Reading:
        with self.lock:
            self.tally["now"] += 1
            self.tally["most"] = max(self.tally["most"], self.tally["now"])
            self.tally[self.who] += 1
        try:
            return self.inner.read()
        finally:
            with self.lock:
                self.tally["now"] -= 1


def test_lease_is_compare_and_set_and_a_deposed_holder_cannot_record(
    pool_rt: Runtime, tmp_path: Path
) -> None:
    rt = pool_rt
    r, p = rt.store.r, rt.store.keys.prefix
    a = WatcherLease(r, p, "h1-a", 30)
    b = WatcherLease(r, p, "h1-b", 30)
    ta = a.take()
    assert ta is not None and ta.startswith("h1-a|")
    assert b.take() is None and b.holder() is not None and b.holder()[0] == "h1-a"  # type: ignore[index]
    fake = "h1-a|" + "0" * 16  # the member's name alone is not the token
    assert not b.renew(fake) and not b.release(fake) and a.renew(ta)
    assert record(rt, None, "x", holder="h1-a", token=ta)
    r.pexpire(lease_key(p), 1)  # the holder stalls: its lease runs out on Redis's clock
    wait_until(lambda: not r.exists(lease_key(p)), 10, what="the lease to expire")
    tb = b.take()
    assert tb is not None
    assert not a.renew(ta) and not a.release(ta)  # the deposed holder can neither renew nor drop it
    assert not record(rt, None, "late write", holder="h1-a", token=ta)  # its late record is refused
    assert r.hget(status_key(p), "holder") == "h1-a" and r.hget(status_key(p), "last_error") == "x"
    assert record(rt, None, "", holder="h1-b", token=tb)
    # The deposed holder's guard stops its cycle before it touches a pool.
    pool_state(rt).set_settings("cms", PoolSettings(0, 2, 60), None)
    with pytest.raises(ConflictError, match="lease went to another worker"):
        cycle(rt, SlurmSource(squeue=script(tmp_path / "squeue", "exit 0")), lambda: a.renew(ta))
    assert b.release(tb) and not r.exists(lease_key(p))


def test_two_holders_only_one_runs_cycles_and_the_other_takes_over(pool_rt: Runtime, tmp_path: Path) -> None:
    rt = pool_rt
    key = status_key(rt.store.keys.prefix)
    empty = SlurmSource(squeue=script(tmp_path / "squeue", "exit 0"))
    tally = {"now": 0, "most": 0, "h1-a": 0, "h1-b": 0}
    lock = threading.Lock()
    stop_a, stop_b = threading.Event(), threading.Event()
    ta = threading.Thread(
        target=serve, args=(rt, Counted(empty, tally, lock, "h1-a"), "h1-a", stop_a, 0.02, 1.0)
    )
    ta.start()
    try:
        wait_until(lambda: rt.store.r.hget(key, "holder") == "h1-a", 60, what="h1-a running cycles")
        tb = threading.Thread(
            target=serve, args=(rt, Counted(empty, tally, lock, "h1-b"), "h1-b", stop_b, 0.02, 1.0)
        )
        tb.start()
        start = int(rt.store.r.hget(key, "cycles") or 0)
        wait_until(lambda: int(rt.store.r.hget(key, "cycles") or 0) >= start + 10, 60, what="10 more cycles")
        assert tally["h1-b"] == 0 and tally["most"] == 1  # h1-b stood by; never two reads at once
        stop_a.set()  # the holder stops: it drops the lease and h1-b takes over
        ta.join(timeout=60)
        assert not ta.is_alive()
        wait_until(lambda: rt.store.r.hget(key, "holder") == "h1-b", 60, what="h1-b taking over")
        wait_until(lambda: tally["h1-b"] >= 3, 60, what="h1-b running cycles")
        assert tally["most"] == 1
        kinds = [(e.kind, e.message) for e in rt.store.read_events(200)]
        assert ("pool_watcher", "h1-b runs the pool watcher") in kinds
    finally:
        stop_a.set()
        stop_b.set()
        ta.join(timeout=60)
        if "tb" in locals():
            tb.join(timeout=60)
    assert rt.store.r.get(lease_key(rt.store.keys.prefix)) is None  # both released on the way out


def warm(rt: Runtime) -> set[str]:
    return {
        i.id
        for i in rt.store.list_instances(state=InstanceState.READY)
        if i.tier is Tier.POOL and i.owner is None and i.vo == "cms"
    }


def live_pool(rt: Runtime) -> set[str]:
    live = (InstanceState.REQUESTED, InstanceState.PLACED, InstanceState.BOOTING, InstanceState.READY)
    return {
        i.id
        for i in rt.store.list_instances()
        if i.tier is Tier.POOL and i.owner is None and i.vo == "cms" and i.state in live
    }


def test_a_hung_squeue_is_cut_off_recorded_and_the_pool_keeps_its_vms(
    pool_rt: Runtime, pool_uids: dict[str, int], tmp_path: Path
) -> None:
    rt = pool_rt
    cms = pool_uids["cms001"]
    pool_state(rt).set_settings("cms", PoolSettings(0, 2, 0), None)  # idle timeout 0: shrinks at once
    pending = script(
        tmp_path / "squeue", "".join(f"echo '{j}|PENDING|cms001|{cms}|1:00:00'\n" for j in (7, 8))
    )
    assert one_cycle(rt, SlurmSource(squeue=pending))
    pool = wait_until(lambda: w if len(w := warm(rt)) == 2 else None, 60, what="2 warm cms VMs")
    # squeue now hangs: its child sleeps with the output pipe open (a wedged slurmctld RPC).
    pidfile = tmp_path / "sleep.pid"
    hung = SlurmSource(
        squeue=script(tmp_path / "squeue-hung", f"sleep 600 &\necho $! > {pidfile}\nwait"), timeout_s=2
    )
    with pytest.raises(ReadFailed, match="slurm read failed: DeadlineExceeded: squeue did not answer in 2 s"):
        cycle(rt, hung)
    sleeper = int(pidfile.read_text())
    wait_until(
        lambda: (
            not Path(f"/proc/{sleeper}").exists()
            or Path(f"/proc/{sleeper}/stat").read_text().split()[2] == "Z"
        ),
        30,
        what="the hung squeue's child killed with its group",
    )
    key = status_key(rt.store.keys.prefix)
    assert one_cycle(rt, hung)  # the loop's cycle returns, with the error recorded
    err = str(rt.store.r.hget(key, "last_error"))
    assert err.startswith("ReadFailed: slurm read failed: DeadlineExceeded: squeue did not answer in 2 s")
    assert json.loads(str(rt.store.r.hget(key, "pending"))) == {"cms": 2}  # the last good reading stands
    assert warm(rt) == pool  # nothing shrank on a failed read
    assert not any(e.kind == "pool_release" and e.instance in pool for e in rt.store.read_events(300))


def test_a_silent_collector_is_cut_off_and_recorded_naming_htcondor(pool_rt: Runtime) -> None:
    rt = dataclasses.replace(
        pool_rt,
        config=pool_rt.config.model_copy(
            update={"pools": pool_rt.config.pools.model_copy(update={"batch": "htcondor"})}
        ),
    )
    with socket.socket() as silent:  # accepts connections (backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {**os.environ, "_CONDOR_COLLECTOR_HOST": f"127.0.0.1:{silent.getsockname()[1]}"}
        src = CondorSource(env=env, timeout_s=2)
        with pytest.raises(DeadlineExceeded, match="htcondor schedd query did not answer in 2 s"):
            src.read()
        assert one_cycle(rt, src)
    err = str(rt.store.r.hget(status_key(rt.store.keys.prefix), "last_error"))
    assert err.startswith("ReadFailed: htcondor read failed: DeadlineExceeded: htcondor schedd query")
    assert rt.store.r.hget(status_key(rt.store.keys.prefix), "errors") == "1"


def test_condor_source_with_no_pool_is_one_line_from_the_child() -> None:
    """The real query path (child process, real htcondor2) with no HTCondor pool here: a clear error at
    once, not a deadline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("_CONDOR_")}
    with pytest.raises(UnavailableError, match=r"htcondor schedd: .*Unable to locate local daemon"):
        CondorSource(env={**env, "CONDOR_CONFIG": "/dev/null"}, timeout_s=120).read()


@pytest.mark.parametrize(
    ("age", "holder", "want", "not_want"),
    [
        (1.0, "worker-1.n", "last run 2026-12-01T03:00:00Z by worker-1.n (held by worker-1.n)", "STALLED"),
        (STALL_CYCLES * 10 + 15 - 1, "worker-1.n", "last run", "STALLED"),  # within a takeover's gap
        (STALL_CYCLES * 10 + 15 + 1, None, "STALLED: no run for 46 s (interval 10 s); ", "held by"),
        (3600.0, "worker-2.n", "STALLED: no run for 3600 s", "never"),
    ],
)
def test_describe_says_stalled_only_past_a_few_cycles_and_a_takeover(
    age: float, holder: str | None, want: str, not_want: str
) -> None:
    raw = {
        "last_run": "2026-12-01T03:00:00Z",
        "last_run_ts": "1000.0",
        "holder": "worker-1.n",
        "interval_s": "10",
        "lease_s": "15",
        "cycles": "4",
        "errors": "0",
    }
    line = describe(raw, 1000.0 + age, holder, 99.0, 99.0)
    assert want in line and not_want not in line


def dynvm(farm: Farm, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DYNVM), *argv], env=farm.env(), capture_output=True, text=True, timeout=60, check=False
    )


def test_status_shows_the_watcher_and_the_requeue_loop_stalled_when_old(
    pool_rt: Runtime, test_farm: Farm
) -> None:
    from batch_hooks.proto import jobvm_key, jobvms_key
    from batch_hooks.requeue import run_forever

    # A site's intervals (10 s cycles, 15 s lease): a run a CLI start ago is far from stalled.
    rt = dataclasses.replace(pool_rt, config=pool_rt.config.model_copy(update={"pools": PoolsConfig()}))
    r, p = rt.store.r, rt.store.keys.prefix
    assert record(rt, None, "", holder="worker-77.h1")
    st = json.loads(dynvm(test_farm, "-o", "json", "status").stdout)
    assert "by worker-77.h1" in st["pool_watcher"] and "STALLED" not in st["pool_watcher"]
    assert st["pool_watcher"].startswith("not run by the workers (pools.batch: none)")  # the farm's config
    r.hset(status_key(p), "last_run_ts", str(rt.store.redis_time() - 3600))
    st = json.loads(dynvm(test_farm, "-o", "json", "status").stdout)
    assert re.search(r"STALLED: no run for 36[0-9][0-9] s", st["pool_watcher"]), st["pool_watcher"]
    shown = json.loads(dynvm(test_farm, "-o", "json", "pool", "show", "cms").stdout)
    assert "STALLED" in shown["watcher"]["summary"] and shown["watcher"]["holder"] == "worker-77.h1"
    listed = dynvm(test_farm, "pool", "list")
    assert "watcher: " in listed.stderr and "STALLED" in listed.stderr

    # The requeue loop: a hostile job record (an instance id that is no id) fails a pass; it is recorded
    # and the loop goes on; once the record is gone the next pass is good again.
    r.sadd(jobvms_key(p), "h1:bad")
    r.hset(jobvm_key(p, "h1:bad"), mapping={"instance": "no such/id", "batch": "slurm"})
    stop = threading.Event()
    t = threading.Thread(
        target=run_forever, args=(rt, {}, stop, 0.02), kwargs={"worker": "h1-w"}, daemon=True
    )
    t.start()
    try:
        wait_until(lambda: int(r.hget(f"{p}:requeue", "errors") or 0) >= 2, 60, what="two failed passes")
        assert "ValidationError" in str(r.hget(f"{p}:requeue", "last_error"))
        r.srem(jobvms_key(p), "h1:bad")
        r.delete(jobvm_key(p, "h1:bad"))
        wait_until(lambda: r.hget(f"{p}:requeue", "last_error") == "", 60, what="a good pass")
        assert t.is_alive()
    finally:
        stop.set()
        t.join(timeout=30)
    assert not t.is_alive()
    runs = int(r.hget(f"{p}:requeue", "runs") or 0)
    stop = threading.Event()  # one more pass at a site's interval (30 s), stopped right after it
    t = threading.Thread(
        target=run_forever, args=(rt, {}, stop, 30.0), kwargs={"worker": "h1-w"}, daemon=True
    )
    t.start()
    wait_until(lambda: int(r.hget(f"{p}:requeue", "runs") or 0) > runs, 60, what="a pass")
    stop.set()
    t.join(timeout=30)
    st = json.loads(dynvm(test_farm, "-o", "json", "status").stdout)
    assert "by h1-w" in st["lost_vm_requeue"] and "STALLED" not in st["lost_vm_requeue"]
    r.hset(f"{p}:requeue", "last_run_ts", str(rt.store.redis_time() - 6000))
    st = json.loads(dynvm(test_farm, "-o", "json", "status").stdout)
    assert (
        st["lost_vm_requeue"].startswith("not run by the workers")
        and "STALLED: no pass for 60" in st["lost_vm_requeue"]
    )


# ---------------------------------------------------------------------------------------------------------
# Real control workers (`dynvm worker`) on the test-driver farm, with real Slurm demand.


def start_worker(cfg: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(DYNVM), "--config", str(cfg), "worker", "--concurrency", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@pytest.mark.slurm
def test_worker_started_watchers_raise_a_pool_from_pending_jobs_and_survive_a_dead_holder(
    slurm: SlurmCluster, test_farm: Farm, tmp_path: Path
) -> None:
    base = yaml.safe_load(test_farm.layout.config_file.read_text())
    base["pools"] = {
        "batch": "slurm",
        "cluster": "dynvmt",
        "watch_interval_s": 0.5,
        "watcher_lease_s": 2.0,
        "read_timeout_s": 30,
    }
    cfg = tmp_path / "dynvm.yaml"
    cfg.write_text(yaml.safe_dump(base))
    from provisioner.configload import load_config

    rt = dataclasses.replace(test_farm.rt, config=load_config(cfg))
    r, p = rt.store.r, rt.store.keys.prefix
    _cleanup(rt)
    key = status_key(p)
    pool_state(rt).set_settings("cms", PoolSettings(0, 2, 3600), None)
    jobs = [slurm.sbatch("cms001", "#!/bin/sh\ntrue\n", "--hold") for _ in range(2)]
    procs = [start_worker(cfg, slurm.env, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        holder = wait_until(
            lambda: r.hget(key, "holder") if int(r.hget(key, "cycles") or 0) else None,
            120,
            what="a worker's watcher running cycles",
        )
        members = {f"worker-{pr.pid}.{os.uname().nodename}": pr for pr in procs}
        assert holder in members
        assert json.loads(str(r.hget(key, "pending"))).get("cms") == 2  # from the real squeue
        pool = wait_until(
            lambda: w if len(w := warm(rt)) == 2 else None,
            120,
            what="the pool raised to 2 warm VMs by the worker",
        )
        assert all(slurm.job(j)["JobState"] == "PENDING" for j in jobs)
        st = json.loads(dynvm(test_farm, "--config", str(cfg), "-o", "json", "status").stdout)
        assert f"held by {holder}" in st["pool_watcher"] and "STALLED" not in st["pool_watcher"]
        assert "by worker-" in st["lost_vm_requeue"]  # the requeue loop of a Slurm worker records passes

        dead = members.pop(holder)
        dead.send_signal(signal.SIGKILL)  # the holder dies without releasing: its lease must run out
        dead.wait(timeout=60)
        (other,) = members
        wait_until(lambda: r.hget(key, "holder") == other, 120, what=f"{other} taking over the watcher")
        cycles = int(r.hget(key, "cycles") or 0)
        wait_until(lambda: int(r.hget(key, "cycles") or 0) >= cycles + 2, 60, what="its cycles")
        assert warm(rt) == pool and live_pool(rt) == pool  # the new holder keeps the target: no extra VM
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.send_signal(signal.SIGTERM)
        for pr in procs:
            try:
                pr.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait(timeout=30)
        slurm.run("scancel", *jobs)
        _cleanup(rt)


def test_pool_watch_once_refuses_while_a_worker_holds_the_watcher(
    pool_rt: Runtime, test_farm: Farm, tmp_path: Path
) -> None:
    base = yaml.safe_load(test_farm.layout.config_file.read_text())
    base["pools"] = {"batch": "slurm", "cluster": "c1"}
    cfg = tmp_path / "dynvm.yaml"
    cfg.write_text(yaml.safe_dump(base))
    lease = WatcherLease(pool_rt.store.r, pool_rt.store.keys.prefix, "worker-9.h1", 60)
    token = lease.take()
    assert token is not None
    try:
        done = dynvm(test_farm, "--config", str(cfg), "pool", "watch", "--once")
        assert done.returncode == 4, done.stderr
        assert done.stderr.strip().splitlines() == [
            "dynvm: error: the pool watcher runs in worker-9.h1 (it holds the watcher lease): "
            "see `dynvm status`"
        ]
    finally:
        assert lease.release(token)
