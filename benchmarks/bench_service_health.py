"""A hung service on the real QEMU farm: how long until it is found, stopped, and ready again.

    sudo .venv/bin/python benchmarks/bench_service_health.py [--trials 3] [--images ce,se,wms]
        [--relocate] [--keep-farm]

A 3-host QEMU farm of its own (``$DYNVM_TEST_CACHE/health-bench``, two monitors).  One service per image
is declared (ce: guest_agent probe, se: tcp :80, wms: exec; each with the health policy its catalogue file
ships: every 2 s, 5 s per sample, 3 failures).  One trial: the service's domain is paused with
``virsh suspend`` through its host's libvirtd at t = 0 (a hung guest: nothing answers); the clock reads
the events for when its agent marked it unhealthy, when the keeper decided, when the agent had destroyed
it, and when the re-placed VM was ready again (its readiness probe passed).  By default the image's restart
limit is raised so every trial is a restart in place; ``--relocate`` sets it to 0 so every trial relocates.
The first trial per image is a warm-up and not counted.  One table: median and max per image and step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libvirt
import yaml

from ha.services import Service, ServiceStore
from provisioner.configload import load_config
from provisioner.control.client import ENDED, client_runtime, release, wait
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.model import InstanceState, Tier
from provisioner.runtime import Runtime

CACHE = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))
ADDRESSES = {"ce": "10.77.0.70", "se": "10.77.0.71", "wms": "10.77.0.72"}
STEPS = ("unhealthy", "decided", "destroyed", "ready")
KIND = {"unhealthy": "service_unhealthy", "decided": "service_hung", "destroyed": "service_stopped"}


def set_limit(catalogue: Path, images: list[str], max_restarts: int) -> None:
    for name in images:
        path = catalogue / f"{name}.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["ha"]["max_restarts"] = max_restarts
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.rename(path)


def wait_for(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while (value := cond()) is None or value is False:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return value


def trial(rt: Runtime, conns: dict[str, Any], svc: str, iid: str) -> dict[str, float]:
    inst = rt.store.require_instance(iid)
    assert inst.host is not None and inst.state is InstanceState.READY
    since = rt.store.last_event_id()
    t0 = time.time()
    conns[inst.host].lookupByName(inst.domain_name).suspend()

    def back() -> bool:
        rec = rt.store.get_instance(iid)
        return rec is not None and rec.state is InstanceState.READY and rec.epoch > inst.epoch

    wait_for(back, 600, f"{svc} ready again")
    out: dict[str, float] = {}
    for e in rt.store.read_events(count=2000, since_id=since):
        at = datetime.fromisoformat(e.ts.replace("Z", "+00:00")).timestamp() - t0
        mine = e.instance == iid or svc in e.message
        for step, kind in KIND.items():
            if mine and e.kind == kind and step not in out:
                out[step] = at
        if e.kind == "ready" and e.instance == iid:
            out["ready"] = at
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3, help="counted trials per image (plus one warm-up)")
    ap.add_argument("--images", default="ce,se,wms")
    ap.add_argument("--relocate", action="store_true", help="restart limit 0: every trial relocates")
    ap.add_argument("--keep-farm", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (the QEMU farm)", file=sys.stderr)
        return 2
    images = [i for i in args.images.split(",") if i]
    layout = FarmLayout(CACHE / "health-bench")
    farm_down(layout)
    farm_up(layout, 3, "qemu", timeout_s=300)
    rt = client_runtime(load_config(layout.config_file))
    set_limit(layout.catalogue, images, 0 if args.relocate else 1000)
    conns: dict[str, Any] = {h.name: libvirt.open(h.uri) for h in rt.config.hosts}
    services = ServiceStore(rt.store.r, rt.store.keys.prefix)
    results: dict[str, list[dict[str, float]]] = {i: [] for i in images}
    probes: dict[str, str] = {}
    ids: dict[str, str] = {}
    try:
        for img in images:
            name = f"{img}-bench"
            services.declare(Service(name, img, Tier.CRITICAL, ADDRESSES[img]))
            iid = wait_for(lambda n=name: services.current_instance(n), 60, f"{name} started")
            ids[name] = iid
            assert wait(rt, iid, 300).state is InstanceState.READY
            spec = rt.catalogue.resolve(img).spec.health
            probes[img] = (f"{spec.type.value} every {spec.interval_s:g} s, {spec.timeout_s:g} s each, "
                           f"{spec.failures} failures" if spec else "none")
        for n in range(args.trials + 1):
            for img in images:
                r = trial(rt, conns, f"{img}-bench", ids[f"{img}-bench"])
                where = rt.store.require_instance(ids[f"{img}-bench"]).host
                steps = ", ".join(f"{s} +{r.get(s, float('nan')):.2f} s" for s in STEPS)
                warm = " (warm-up)" if n == 0 else ""
                print(f"trial {n}{warm} {img}: {steps} (now on {where})", flush=True)
                if n > 0:
                    results[img].append(r)
    finally:
        for name, iid in ids.items():
            services.remove(name)
            release(rt, iid)
            wait(rt, iid, 120, until=ENDED)
        for c in conns.values():
            c.close()
        if not args.keep_farm:
            farm_down(layout)
    mode = "relocation" if args.relocate else "restart in place"
    print(f"\nhung service -> {mode}, seconds after `virsh suspend` (median / max of {args.trials} trials)")
    print(f"{'image':6} {'health probe':44} " + " ".join(f"{s:>15}" for s in STEPS))
    for img in images:
        cells = []
        for s in STEPS:
            xs = [r[s] for r in results[img] if s in r]
            cells.append(f"{statistics.median(xs):6.2f} / {max(xs):6.2f}" if xs else f"{'-':>15}")
        print(f"{img:6} {probes[img]:44} " + " ".join(f"{c:>15}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
