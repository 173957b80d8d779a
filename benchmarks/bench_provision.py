"""Control-plane overhead of `provision` on the test-driver farm.

    python benchmarks/bench_provision.py [--sequential 200] [--total 1000] [--inflight 100]

Starts its own farm (3 hosts on libvirt's test driver, a private Redis) in a temporary directory,
then measures, from the requesting client's point of view:
  * one request at a time: request sent -> domain running and recorded ready, minus libvirt's own
    define+create time measured by the agent in the same run (control-plane overhead), p50/p99;
  * N requests in flight: provisions per second and latency p50/p99.
Goals (issue #3): sequential overhead p50 < 30 ms and p99 < 100 ms; >= 100 provisions/s at 100 in flight.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provisioner.configload import load_config
from provisioner.control.client import client_runtime, release, submit, wait
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def libvirt_ms_by_instance(rt, ids: set[str]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    out: dict[str, float] = {}
    since = None
    while True:
        evs = (
            rt.store.read_events(count=1000, since_id=since) if since else rt.store.read_events(count=100000)
        )
        if not evs:
            break
        for e in evs:
            if e.kind == "ready" and e.instance in ids and "libvirt_ms" in e.extra:
                out[e.instance] = float(e.extra["libvirt_ms"])
        if since is None:
            break
        since = evs[-1].id
    return out


def one(rt, image, vo) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    inst, _ = submit(rt, image, vo)
    done = wait(rt, inst.id, 60)
    dt = (time.perf_counter() - t0) * 1000
    if done.state.value != "ready":
        raise SystemExit(f"instance {inst.id} ended {done.state.value}: {done.reason}")
    return inst.id, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--total", type=int, default=1000)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--hosts", type=int, default=3)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dynvm-bench-"))
    layout = FarmLayout(base)
    t0 = time.perf_counter()
    farm_up(layout, a.hosts, "test", host_cpus=4096, host_memory_mib=4096 * 1024)
    print(f"farm up ({a.hosts} hosts, test driver): {time.perf_counter() - t0:.2f} s")
    try:
        rt = client_runtime(load_config(layout.config_file))
        from provisioner.control.client import choose_image

        image, vo = choose_image(rt, None, "cms")
        for _ in range(10):  # warm-up: imports, connections, first define on each host
            one(rt, image, vo)
        lat: dict[str, float] = {}
        for _ in range(a.sequential):
            iid, dt = one(rt, image, vo)
            lat[iid] = dt
        virt = libvirt_ms_by_instance(rt, set(lat))
        overhead = [lat[i] - virt.get(i, 0.0) for i in lat]
        print(
            f"sequential, {a.sequential} requests: request->ready p50 {pct(list(lat.values()), 50):.1f} ms, "
            f"p99 {pct(list(lat.values()), 99):.1f} ms; libvirt define+create p50 "
            f"{statistics.median(virt.values()):.2f} ms"
        )
        p50, p99 = pct(overhead, 50), pct(overhead, 99)
        print(
            f"  control-plane overhead p50 {p50:.1f} ms (goal < 30), p99 {p99:.1f} ms (goal < 100) -> "
            f"{'MET' if p50 < 30 and p99 < 100 else 'NOT MET'}"
        )
        ids = list(lat)
        results: list[float] = []
        lock = threading.Lock()

        def task(_: int) -> None:
            iid, dt = one(rt, image, vo)
            with lock:
                results.append(dt)
                ids.append(iid)

        t1 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=a.inflight) as ex:
            list(ex.map(task, range(a.total)))
        el = time.perf_counter() - t1
        rate = a.total / el
        print(
            f"{a.inflight} in flight, {a.total} requests: {rate:.0f} provisions/s (goal >= 100 -> "
            f"{'MET' if rate >= 100 else 'NOT MET'}), latency p50 {pct(results, 50):.0f} ms, "
            f"p99 {pct(results, 99):.0f} ms"
        )
        for iid in ids:
            release(rt, iid)
    finally:
        farm_down(layout)


if __name__ == "__main__":
    main()
