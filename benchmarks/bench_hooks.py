"""Batch hook latency on the test-driver farm (issue #8).

    python benchmarks/bench_hooks.py [--sequential 30] [--burst 200]

Starts its own farm (3 hosts on libvirt's test driver with room for the burst, a private Redis; its control
worker serves the hooks) and a trusted-hook Redis ACL user, then measures:
  * import time of the hook path (python -X importtime, cumulative of the hook's own imports) beside the
    full CLI's, and an empty interpreter's start;
  * cold prolog latency *including interpreter start*: ``python -m batch_hooks generic prolog ...`` as a
    batch system runs it, one at a time, each provisioning a new VM (no warm pool), p50/p90;
  * the old way for comparison: ``dynvm vm provision --vo cms --wait`` (full CLI + Celery client), p50;
  * a burst: N prologs started at once (one process each), how many succeed, wall time;
  * with --slurm (slurm-wlm + munge installed): through a private slurmctld with deploy/slurm's hooks,
    sbatch -> job RUNNING, one job at a time, p50 (the job waits in CONFIGURING for PrologSlurmctld);
  * with --qemu N (root, instead of the above): on a 1-host QEMU farm, hook request -> payload done inside
    a cold VM (prolog + `cat /etc/vo` through the payload path) beside a raw define+create+readiness
    marker of the same domain XML, alternating (goal: within 10 %).
Goals: cold prolog p50 < 200 ms; all N succeed.  Needs root (pool accounts cms001.. are created).
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provisioner.configload import load_config
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.state.store import StateStore

PY = sys.executable
POOL = {"cms": "cms001", "atlas": "atlas001", "lhcb": "lhcb001"}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def ensure_accounts() -> None:
    for group, user in POOL.items():
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", group], check=True)
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "-M", "-N", "-g", group, "-s", "/bin/sh", "-d", "/tmp", user],
                           check=True)


def import_ms(code: str) -> float:
    """Cumulative import time (ms) of everything ``code`` imports beyond an empty interpreter's start."""
    out = subprocess.run([PY, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         check=True).stderr
    base = subprocess.run([PY, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr

    def top(text: str) -> dict[str, int]:
        rows = (re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", ln) for ln in text.splitlines())
        return {m.group(2): int(m.group(1)) for m in rows if m and not m.group(2).startswith(" ")}

    extra = {k: v for k, v in top(out).items() if k not in top(base)}
    return sum(extra.values()) / 1000


def run_ms(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    return (time.perf_counter() - t) * 1000, res


def prolog_argv(job: str, user: str, op: str = "prolog") -> list[str]:
    return [PY, "-m", "batch_hooks", "generic", op, "--system", "pbs", "--cluster", "bench", "--job-id", job,
            "--user", user]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequential", type=int, default=30)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--slurm", type=int, default=0, help="jobs to time through a private Slurm (0 = skip)")
    ap.add_argument("--qemu", type=int, default=0, help="cold VM runs on a QEMU farm (0 = test driver)")
    args = ap.parse_args()
    ensure_accounts()
    if args.qemu:
        qemu_payload_vs_raw(args.qemu)
        return
    base = Path(tempfile.mkdtemp(prefix="dynvm-bench-hooks-"))
    layout = FarmLayout(base)
    farm_up(layout, 3, "test", host_cpus=args.burst, host_memory_mib=args.burst * 1024)
    try:
        config = load_config(layout.config_file)
        store = StateStore.from_url(config.redis_url)
        password = secrets.token_hex(16)
        store.r.execute_command("ACL", "SETUSER", "bench-hook", "reset", "on", f">{password}",  # type: ignore[no-untyped-call]
                                "~dynvm:hooks", "~dynvm:hookreply:*", "-@all", "+lpush", "+blpop", "+time")
        kw = store.r.connection_pool.connection_kwargs
        env = {**os.environ, "DYNVM_HOOK_REDIS": f"redis://bench-hook:{password}@{kw['host']}:{kw['port']}/0",
               "DYNVM_PROLOG_TIMEOUT": "120", "DYNVM_CONFIG": str(layout.config_file)}
        hook_imp = import_ms("import batch_hooks.generic, batch_hooks.proto, batch_hooks.resp, "
                             "batch_hooks.hookcfg")
        cli_imp = import_ms("from provisioner.cli.main import build_parser; build_parser()")
        empty = [run_ms([PY, "-c", "pass"], env)[0] for _ in range(10)]
        print(f"imports: hook path {hook_imp:.1f} ms; full dynvm CLI {cli_imp:.1f} ms; "
              f"empty interpreter start p50 {statistics.median(empty):.1f} ms")
        run_ms(prolog_argv("warmup", "cms001"), env)
        run_ms(prolog_argv("warmup", "cms001", "epilog"), env)
        lat: list[float] = []
        for i in range(args.sequential):
            user = list(POOL.values())[i % 3]
            ms, res = run_ms(prolog_argv(f"s{i}", user), env)
            assert res.returncode == 0, res.stderr
            lat.append(ms)
            run_ms(prolog_argv(f"s{i}", user, "epilog"), env)
        print(f"cold prolog incl. interpreter start (n={len(lat)}): p50 {pct(lat, 50):.0f} ms, "
              f"p90 {pct(lat, 90):.0f} ms, max {max(lat):.0f} ms")
        old = []
        for _ in range(min(10, args.sequential)):
            cli = [PY, "-m", "provisioner.cli.main", "-o", "json", "vm", "provision", "--vo", "cms", "--wait"]
            ms, res = run_ms(cli, env)
            assert res.returncode == 0, res.stderr
            old.append(ms)
        print(f"for comparison, dynvm vm provision --vo cms --wait (n={len(old)}): p50 {pct(old, 50):.0f} ms")
        t = time.perf_counter()
        procs = [subprocess.Popen(prolog_argv(f"b{i}", list(POOL.values())[i % 3]), env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(args.burst)]
        codes = [p.wait(timeout=600) for p in procs]
        wall = time.perf_counter() - t
        ok = sum(1 for c in codes if c == 0)
        errors = {p.stderr.read().strip()[:120] for p, c in zip(procs, codes, strict=True)
                  if c != 0 and p.stderr}
        print(f"burst: {args.burst} prologs at once: {ok} succeeded in {wall:.1f} s wall"
              + (f"; errors: {sorted(errors)[:3]}" if errors else ""))
        if args.slurm:
            job_redis = f"redis://{kw['host']}:{kw['port']}/0"
            slurm_submit_to_running(env["DYNVM_HOOK_REDIS"], job_redis, args.slurm)
    finally:
        farm_down(layout)


def qemu_payload_vs_raw(runs: int) -> None:
    import io

    from batch_hooks.context import JobContext
    from batch_hooks.payload import run as run_payload
    from batch_hooks.proto import call
    from batch_hooks.resp import LightRedis
    from provisioner.control.client import ENDED, wait
    from provisioner.hypervisor.libvirt_host import LibvirtHost

    cache = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))
    layout = FarmLayout(cache / "bench-hooks-farm")
    farm_down(layout)
    farm_up(layout, 1, "qemu", timeout_s=180)
    config = load_config(layout.config_file)
    store = StateStore.from_url(config.redis_url)
    password = secrets.token_hex(16)
    store.r.execute_command("ACL", "SETUSER", "bench-hook", "reset", "on", f">{password}",  # type: ignore[no-untyped-call]
                            "~dynvm:hooks", "~dynvm:hookreply:*", "-@all", "+lpush", "+blpop", "+time")
    kw = store.r.connection_pool.connection_kwargs
    base = f"{kw['host']}:{kw['port']}/0"
    hc = config.hosts[0]
    conn = LibvirtHost(hc.uri)
    pw = pwd.getpwnam("cms001")
    dyn: list[float] = []
    raw: list[float] = []
    try:
        with LightRedis(f"redis://bench-hook:{password}@{base}") as r:
            for i in range(runs + 1):  # run 0 warms libvirt's caches and is not counted
                ctx = JobContext(batch="slurm", cluster="bench", job_id=f"q{i}", attempt=0, user="cms001",
                                 uid=pw.pw_uid, gid=pw.pw_gid)
                t = time.perf_counter()
                vm = call(r, "dynvm", "prolog", ctx, 180)
                env = {"DYNVM_JOB_CRED": f"{vm['job_user']}:{vm['job_password']}",
                       "DYNVM_JOB_REDIS": f"redis://{base}"}
                out = io.StringIO()
                code = run_payload(env, "cat /etc/vo\n", out, io.StringIO())
                assert code == 0 and out.getvalue() == "cms\n", (code, out.getvalue())
                t_dyn = time.perf_counter() - t
                inst = store.require_instance(vm["instance"])
                xml = conn.domain_xml(inst.domain_name)
                assert xml is not None
                call(r, "dynvm", "epilog", ctx, 60)
                rt_wait = _client(config)
                wait(rt_wait, inst.id, 60, until=ENDED)
                t_raw = _raw_boot(conn, config, hc.name, inst.id, xml, f"rawq{i:03d}")
                if i:
                    dyn.append(t_dyn)
                    raw.append(t_raw)
                print(f"  run {i}: hook->payload done {t_dyn:.2f} s, raw boot {t_raw:.2f} s"
                      f"{'  (warm-up)' if not i else ''}")
    finally:
        conn.close()
        farm_down(layout)
    d50, r50 = statistics.median(dyn), statistics.median(raw)
    print(f"QEMU: hook request -> payload done in a cold VM p50 {d50:.2f} s; raw define+create+marker p50 "
          f"{r50:.2f} s; {(d50 / r50 - 1) * 100:+.1f} % (goal within 10 %)")


def _client(config):  # type: ignore[no-untyped-def]
    from provisioner.control.client import client_runtime

    return client_runtime(config)


def _raw_boot(conn, config, host: str, iid: str, xml: str, name: str) -> float:  # type: ignore[no-untyped-def]
    from provisioner.probes import SerialMarkerProbe, wait_ready

    run_dir = config.storage.shared_dir / "run" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    rxml = re.sub(r"<uuid>[^<]*</uuid>", "", xml.replace(iid, name))
    rxml = re.sub(r"<metadata[ >].*?</metadata>", "", rxml, flags=re.S)
    marker = "DYNVM_READY"
    t = time.perf_counter()
    conn.define_and_start(f"dynvm-{name}", rxml)
    probe = SerialMarkerProbe(run_dir / f"console-{host}.log", marker)
    wait_ready(probe, time.monotonic() + 120, interval=0.05)
    took = time.perf_counter() - t
    conn.destroy(f"dynvm-{name}")
    conn.undefine(f"dynvm-{name}")
    return took


def configuring_ms(log: str) -> list[float]:
    from datetime import datetime

    def ts(line: str) -> float:
        return datetime.fromisoformat(line[1:24]).timestamp()

    alloc: dict[str, float] = {}
    out = []
    for line in log.splitlines():
        if m := re.search(r"sched: Allocate JobId=(\d+) ", line):
            alloc[m.group(1)] = ts(line)
        elif (m := re.search(r"Configuration for JobId=(\d+) is complete", line)) and m.group(1) in alloc:
            out.append((ts(line) - alloc.pop(m.group(1))) * 1000)
    return out


def slurm_submit_to_running(hook_url: str, job_redis: str, n: int) -> None:
    from tests.batch_hooks.conftest import start_slurm

    gen = start_slurm(hook_url, job_redis, wrap_payload=False)
    cluster = next(gen)
    try:
        lat = []
        for i in range(n):
            t = time.perf_counter()
            job = cluster.sbatch(list(POOL.values())[i % 3], "#!/bin/sh\nsleep 1\n")
            started = ("RUNNING", "COMPLETED", "COMPLETING", "")
            while cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() not in started:
                time.sleep(0.01)
            lat.append((time.perf_counter() - t) * 1000)
        print(f"slurm: sbatch -> RUNNING through PrologSlurmctld (n={n}): p50 {pct(lat, 50):.0f} ms, "
              f"p90 {pct(lat, 90):.0f} ms (includes sbatch as the pool account and squeue polling)")
        conf = configuring_ms((cluster.base / "log" / "slurmctld.log").read_text())
        if conf:
            print(f"slurm: of which CONFIGURING (allocate -> PrologSlurmctld done, slurmctld's log): "
                  f"p50 {pct(conf, 50):.0f} ms, p90 {pct(conf, 90):.0f} ms; the rest is Slurm's scheduling")
    finally:
        gen.close()


if __name__ == "__main__":
    main()
