"""Retention benchmark: do ended records slow the hot paths?  (issue 7: "hot state is live state")

    python benchmarks/bench_retention.py [--live 10000] [--ended 100000] [--runs 7]

Two stores on a private redis-server: 10,000 live records alone, and the same 10,000 live plus 100,000
ended ones (80 % gone, 15 % failed, 5 % lost) as the lifecycle leaves them in Redis.  Where the code has
the retention step (provisioner.state.retention), it is run first, as every control worker's sweeper does.
Measured, median and p95 of --runs: placement (snapshot with instances + schedule one request; and the
light snapshot without instances), `vm list` (store.list_instances as the CLI calls it), and one host's
records as the reconciler reads them.  To compare with the code before the retention, run the script with
PYTHONPATH pointing at a checkout of that commit.  Prints figures; exit 0 either way.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH (another checkout) wins


import provisioner
from provisioner.model import Capacity, Host, Instance, InstanceState, Role, Tier
from provisioner.scheduler import PlacementRequest, SchedulerPolicy, schedule
from provisioner.state import StateStore
from provisioner.state.codec import instance_to_fields
from tests.redisproc import PrivateRedis

HOSTS = 100
S = InstanceState


def populate(store: StateStore, n_live: int, n_ended: int, seed: int = 7) -> None:
    """Hosts through the store; records written as create_instance + transitions leave them (pipelined:
    110,000 scripted creates would take longer than the measurement)."""
    rnd = random.Random(seed)
    for i in range(HOSTS):
        store.register_host(Host(f"hv{i:03d}", "test:///default", capacity=Capacity(1024, 4 * 1024 * 1024)))
        store.r.set(store.keys.lease(f"hv{i:03d}"), "bench", px=3_600_000)
    p = store.keys.prefix
    pipe = store.r.pipeline(transaction=False)
    for j in range(n_live + n_ended):
        if j < n_live:
            state = S.READY
        else:
            x = rnd.random()
            state = S.GONE if x < 0.80 else S.FAILED if x < 0.95 else S.LOST
        host = f"hv{rnd.randrange(HOSTS):03d}"
        iid = f"{'l' if j < n_live else 'e'}{j:07d}"
        inst = Instance(
            iid,
            Role.WORKER,
            "cms-wn:1",
            1,
            1024,
            state,
            Tier.WORKER,
            "cms",
            host,
            owner=f"job-{j}",
            idempotency_key=f"job:c:{j}:0",
            created=time.time(),
            updated=time.time(),
        )
        pipe.hset(store.keys.inst(iid), mapping=dict(instance_to_fields(inst)))  # type: ignore[arg-type]
        pipe.sadd(f"{p}:insts", iid)
        pipe.sadd(store.keys.by_state(state.value), iid)
        pipe.sadd(store.keys.by_role("worker"), iid)
        pipe.sadd(store.keys.by_host(host), iid)
        pipe.set(store.keys.idem(f"job:c:{j}:0"), iid)
        if state is S.READY:
            pipe.hset(store.keys.claims(host), iid, "1,1024,cms,")
            pipe.hincrby(store.keys.host(host), "used_vcpus", 1)
            pipe.hincrby(store.keys.host(host), "used_memory_mib", 1024)
        if j % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def metrics(store: StateStore) -> dict[str, Callable[[], object]]:
    policy = SchedulerPolicy()
    req = [PlacementRequest("new-1", 2, 2048, Tier.WORKER, vo="cms")]
    return {
        "placement (snapshot+schedule)": lambda: schedule(req, store.snapshot(), policy),
        "placement, light snapshot": lambda: schedule(req, store.snapshot(instances=False), policy),
        "vm list": lambda: [i for i in store.list_instances() if i.state is not S.GONE],
        "one host's records": lambda: store.list_instances(host="hv007"),
    }


def measure(stores: dict[str, StateStore], runs: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Median and p95 per store and metric; the stores take turns run by run, so load from other
    processes on the machine falls on every column alike."""
    fns = {label: metrics(store) for label, store in stores.items()}
    samples: dict[str, dict[str, list[float]]] = {lb: {m: [] for m in f} for lb, f in fns.items()}
    for _ in range(runs):
        for metric in next(iter(fns.values())):
            for label, f in fns.items():
                t = time.perf_counter()
                f[metric]()
                samples[label][metric].append((time.perf_counter() - t) * 1000)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for label, per in samples.items():
        out[label] = {}
        for metric, xs in per.items():
            xs.sort()
            out[label][metric] = (xs[len(xs) // 2], xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--live", type=int, default=10_000)
    ap.add_argument("--ended", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    print(f"code: {Path(provisioner.__file__).resolve().parent.parent}")
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as d:
        server = PrivateRedis(Path(d)).start()
        url = server.url
        try:
            stores: dict[str, StateStore] = {}
            for db, (label, ended) in enumerate(
                ((f"{a.live} live", 0), (f"{a.live} live + {a.ended} ended", a.ended))
            ):
                store = StateStore.from_url(url.rsplit("/", 1)[0] + f"/{db}")
                store.r.flushdb()
                populate(store, a.live, ended)
                retire = getattr(store, "retire_ended", None)
                if retire is not None:  # what the sweeper does within one sweep interval
                    t = time.perf_counter()
                    n = retire(100_000)
                    print(
                        f"[{label}] retention step retired {n} records in {(time.perf_counter() - t):.2f} s"
                    )
                stores[label] = store
            results = measure(stores, a.runs)
            for store in stores.values():
                store.close()
        finally:
            server.stop()
    labels = list(results)
    print(f"\n{'ms (median / p95)':<32}" + "".join(f"{lb:>34}" for lb in labels))
    for metric in results[labels[0]]:
        cells = "".join(f"{results[lb][metric][0]:>22.1f} / {results[lb][metric][1]:>8.1f}" for lb in labels)
        print(f"{metric:<32}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
