"""Warm pools (issue #9): demand watcher cost per cycle, and a prolog's warm-pool hit vs a cold start.

    python benchmarks/bench_pools.py [--jobs 10000] [--vos 20] [--cycles 20] [--prologs 20]

Starts its own farm (3 hosts on libvirt's test driver, a private Redis; its control worker serves the hooks).
Needs root: pool accounts cms001.. and, for the demand part, bvo01..bvoNN (group bvoNN, one per VO) are
created if missing (and left, like the test suite's pool accounts).

  * demand watcher: a canned ``squeue`` output of --jobs pending jobs across --vos VOs (round robin over the
    VOs' pool accounts), read through a real subprocess (one call per cycle, as in production); figures for
    the squeue call + parse, the VO count (identity lookups cached per cycle) and the whole cycle (Redis
    reads of every VO's pool, breaker and limits; pools set to max 0 so nothing boots), p50/p90;
  * prolog latency *including interpreter start* (``python -m batch_hooks generic prolog ...`` as a batch
    system runs it): with a ready warm VM of the job's VO (the watcher filled the pool first), and cold
    (no pool), p50/p90.  Goal: warm-pool hit p50 < 100 ms;
  * with --qemu N (root; instead of the above): on a 1-host QEMU farm, a job's hook request -> its
    unmodified payload (``cat /etc/vo``) done inside a warm VM of its VO (the pool refilled by a watcher
    cycle between runs, not timed), beside the same through a cold VM, alternating.  Goal: warm p50 < 0.5 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import pwd
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch_hooks.demand import SlurmSource, VOResolver, count
from batch_hooks.pools import PoolSettings
from batch_hooks.watcher import cycle, pool_state
from provisioner.config import PoolsConfig, VOConfig
from provisioner.configload import load_config
from provisioner.control.client import client_runtime
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.model import InstanceState, Tier
from provisioner.runtime import Runtime

PY = sys.executable
FAMILY = """schema_version: 1
name: {vo}-wn
kind: worker
vos: [{vo}]
versions:
  - version: "1.0"
    boot: {{kernel: {{path: test/vmlinux, sha256: local}}}}
channels:
  stable: "1.0"
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def account(group: str, user: str) -> int:
    try:
        grp.getgrnam(group)
    except KeyError:
        subprocess.run(["groupadd", group], check=True)
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "-M", "-N", "-g", group, "-s", "/bin/sh", "-d", "/tmp", user], check=True)
    return pwd.getpwnam(user).pw_uid


def fake_squeue(d: Path, text: str) -> SlurmSource:
    (d / "out.txt").write_text(text)
    script = d / "squeue"
    script.write_text(f"#!/bin/sh\nexec cat {d / 'out.txt'}\n")
    script.chmod(0o755)
    return SlurmSource(squeue=str(script))


def demand_part(rt: Runtime, work: Path, jobs: int, vos: int, cycles: int) -> None:
    from provisioner.catalogue.store import Catalogue

    names = [f"bvo{i:02d}" for i in range(1, vos + 1)]
    uids = {n: account(n, f"{n}001") for n in names}
    cat = work / "catalogue"
    cat.mkdir()
    for f in rt.config.catalogue_dir.glob("*.yaml"):
        (cat / f.name).write_text(f.read_text())
    for n in names:
        (cat / f"{n}-wn.yaml").write_text(FAMILY.format(vo=n))
    more = {n: VOConfig(image=f"{n}-wn", groups=[n]) for n in names}
    cfg = rt.config.model_copy(update={"vos": {**rt.config.vos, **more}, "catalogue_dir": cat,
                                       "pools": PoolsConfig(batch="slurm", cluster="bench")})
    brt = dataclasses.replace(rt, config=cfg, catalogue=Catalogue.load_serving(cat, cfg.storage.artefacts),
                              catalogue_mtime=None)
    for n in names:
        pool_state(brt).set_settings(n, PoolSettings(0, 0, 60), None)  # planned every cycle, nothing boots
    lines = "".join(f"{1_000_000 + j}|PENDING|{names[j % vos]}001|{uids[names[j % vos]]}|1:00:00\n"
                    for j in range(jobs))
    src = fake_squeue(work, lines)
    print(f"demand: canned squeue output {len(lines) / 1024:.0f} KiB, {jobs} pending jobs across {vos} VOs")
    reads, counts, totals = [], [], []
    for _ in range(cycles):
        t = time.perf_counter()
        reading = src.read()
        t1 = time.perf_counter()
        d = count(reading, VOResolver(cfg))
        t2 = time.perf_counter()
        rep = cycle(brt, src)
        totals.append(rep.total_ms)
        reads.append((t1 - t) * 1000)
        counts.append((t2 - t1) * 1000)
        assert sum(d.pending.values()) == jobs and len(d.pending) == vos and rep.pending == d.pending
    print(f"  squeue call + parse (one subprocess): p50 {pct(reads, 50):.1f} ms, p90 {pct(reads, 90):.1f} ms")
    print(f"  count per VO (trusted identity, cached per cycle): p50 {pct(counts, 50):.1f} ms")
    print(f"  whole watcher cycle (read, count, {vos} pools planned, reclaim): p50 {pct(totals, 50):.1f} ms, "
          f"p90 {pct(totals, 90):.1f} ms")


def prolog_ms(job: str, env: dict[str, str]) -> tuple[float, str]:
    argv = [PY, "-m", "batch_hooks", "generic", "prolog", "--system", "pbs", "--cluster", "bench", "--job-id",
            job, "--user", "cms001"]
    t = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    ms = (time.perf_counter() - t) * 1000
    assert res.returncode == 0, res.stderr
    epilog = [*argv[:4], "epilog", *argv[5:]]
    subprocess.run(epilog, env=env, capture_output=True, timeout=120, check=True)
    return ms, res.stdout


def prolog_part(rt: Runtime, work: Path, env: dict[str, str], n: int) -> None:
    ps = pool_state(rt)
    uid = account("cms", "cms001")
    ps.set_settings("cms", PoolSettings(0, n, 3600), None)
    cfg = rt.config.model_copy(update={"pools": PoolsConfig(batch="slurm")})
    prt = dataclasses.replace(rt, config=cfg)
    pending = "".join(f"{j}|PENDING|cms001|{uid}|1:00:00\n" for j in range(n))
    src = fake_squeue(work, pending)
    cycle(prt, src)
    deadline = time.monotonic() + 120
    while len(warm(rt)) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    before = len(warm(rt))
    hits = 0
    lat: list[float] = []
    for i in range(n):
        pool_before = set(warm(rt))
        ms, _ = prolog_ms(f"w{i}", env)
        inst = rt.store.instance_for_key(f"job:bench:w{i}:0")
        hits += inst is not None and inst.id in pool_before
        lat.append(ms)
    print(f"prolog with a warm-pool hit incl. interpreter start (n={n}, {hits} hits of {before} warm): "
          f"p50 {pct(lat, 50):.0f} ms, p90 {pct(lat, 90):.0f} ms")
    ps.set_settings("cms", PoolSettings(0, 0, 0), None)
    cold = [prolog_ms(f"c{i}", env)[0] for i in range(n)]
    print(f"cold prolog (no pool) incl. interpreter start (n={n}): p50 {pct(cold, 50):.0f} ms, "
          f"p90 {pct(cold, 90):.0f} ms")
    empty = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], check=True)
        empty.append((time.perf_counter() - t) * 1000)
    print(f"for reference: empty interpreter start p50 {statistics.median(empty):.0f} ms")


def warm(rt: Runtime) -> list[str]:
    return [i.id for i in rt.store.list_instances(state=InstanceState.READY)
            if i.tier is Tier.POOL and i.owner is None and i.vo == "cms"]


def hook_user(rt: Runtime) -> tuple[str, dict[str, object]]:
    """The trusted hooks' Redis ACL user (may only push requests and read replies); its password and the
    farm Redis's connection settings."""
    password = secrets.token_hex(16)
    rt.store.r.execute_command("ACL", "SETUSER", "bench-hook", "reset", "on", f">{password}",  # type: ignore[no-untyped-call]
                               "~dynvm:hooks", "~dynvm:hookreply:*", "-@all", "+lpush", "+blpop", "+time")
    return password, rt.store.r.connection_pool.connection_kwargs


def qemu_warm_vs_cold(runs: int) -> None:
    import io
    import os

    from batch_hooks.context import JobContext
    from batch_hooks.payload import run as run_payload
    from batch_hooks.proto import call
    from batch_hooks.resp import LightRedis
    from provisioner.control.client import ENDED, wait

    cache = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))
    layout = FarmLayout(cache / "bench-pools-farm")
    farm_down(layout)
    t0 = time.monotonic()
    farm_up(layout, 1, "qemu", timeout_s=240)
    print(f"farm up (1 QEMU host): {time.monotonic() - t0:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="dynvm-bench-pools-q-"))
    try:
        rt = client_runtime(load_config(layout.config_file))
        password, kw = hook_user(rt)
        base = f"{kw['host']}:{kw['port']}/0"
        uid = account("cms", "cms001")
        pw = pwd.getpwnam("cms001")
        slurm_pools = rt.config.model_copy(update={"pools": PoolsConfig(batch="slurm")})
        prt = dataclasses.replace(rt, config=slurm_pools)
        src = fake_squeue(work, f"1|PENDING|cms001|{uid}|1:00:00\n")
        ps = pool_state(rt)

        def job(r: LightRedis, name: str) -> tuple[float, bool]:
            ctx = JobContext(batch="slurm", cluster="bench", job_id=name, attempt=0, user="cms001",
                             uid=pw.pw_uid, gid=pw.pw_gid)
            pool_before = set(warm(rt))
            t = time.perf_counter()
            vm = call(r, "dynvm", "prolog", ctx, 240)
            env = {"DYNVM_JOB_CRED": f"{vm['job_user']}:{vm['job_password']}", "DYNVM_JOB_REDIS": f"redis://{base}"}
            out = io.StringIO()
            code = run_payload(env, "cat /etc/vo\n", out, io.StringIO())
            took = time.perf_counter() - t
            assert code == 0 and out.getvalue() == "cms\n", (code, out.getvalue())
            call(r, "dynvm", "epilog", ctx, 60)
            wait(rt, vm["instance"], 120, until=ENDED)
            return took, vm["instance"] in pool_before

        warm_s: list[float] = []
        cold_s: list[float] = []
        with LightRedis(f"redis://bench-hook:{password}@{base}") as r:
            for i in range(runs + 1):  # run 0 warms libvirt's caches and is not counted
                ps.set_settings("cms", PoolSettings(1, 1, 3600), None)
                cycle(prt, src)
                deadline = time.monotonic() + 240
                while not warm(rt) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not warm(rt):
                    raise SystemExit("no warm cms VM became ready within 240 s")
                w, hit = job(r, f"qw{i}")
                assert hit, "the job did not take the warm VM"
                ps.set_settings("cms", PoolSettings(0, 0, 0), None)
                cycle(prt, src)  # retire whatever the pool refilled: the next job is cold
                deadline = time.monotonic() + 120
                while warm(rt) and time.monotonic() < deadline:
                    time.sleep(0.1)
                c, _ = job(r, f"qc{i}")
                if i:
                    warm_s.append(w)
                    cold_s.append(c)
                print(f"  run {i}: warm-pool hit -> payload done {w:.2f} s, cold {c:.2f} s"
                      f"{'  (warm-up)' if not i else ''}", flush=True)
    finally:
        farm_down(layout)
    w50, c50 = statistics.median(warm_s), statistics.median(cold_s)
    print(f"QEMU: job hook request -> payload done in a warm VM p50 {w50:.2f} s (max {max(warm_s):.2f}; "
          f"goal < 0.5 s -> {'MET' if w50 < 0.5 else 'NOT MET'}); in a cold VM p50 {c50:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--vos", type=int, default=20)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--prologs", type=int, default=20)
    ap.add_argument("--qemu", type=int, default=0, help="warm vs cold runs on a QEMU farm (0 = test driver)")
    args = ap.parse_args()
    if args.qemu:
        qemu_warm_vs_cold(args.qemu)
        return
    base = Path(tempfile.mkdtemp(prefix="dynvm-bench-pools-"))
    layout = FarmLayout(base / "farm")
    farm_up(layout, 3, "test", host_cpus=64, host_memory_mib=64 * 1024)
    try:
        rt = client_runtime(load_config(layout.config_file))
        password, kw = hook_user(rt)
        import os

        env = {**os.environ, "DYNVM_HOOK_REDIS": f"redis://bench-hook:{password}@{kw['host']}:{kw['port']}/0",
               "DYNVM_PROLOG_TIMEOUT": "120", "DYNVM_CONFIG": str(layout.config_file)}
        demand_part(rt, base, args.jobs, args.vos, args.cycles)
        prolog_part(rt, base, env, args.prologs)
    finally:
        farm_down(layout)


if __name__ == "__main__":
    main()
