"""Provisioning on the real QEMU farm: dynvm request -> ready (cold) next to a raw libvirt
define + create + wait-for-marker of the very same domain XML, in the same run, alternating.

    sudo .venv/bin/python benchmarks/bench_qemu_provision.py [--runs 10]

Goal (issue #4): dynvm adds under 5 % on top of the guest's own boot.  Needs root.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provisioner.configload import load_config
from provisioner.control.client import ENDED, choose_image, client_runtime, release, submit, wait
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.probes import SerialMarkerProbe, wait_ready

CACHE = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    layout = FarmLayout(CACHE / "bench-farm")
    farm_down(layout)
    t0 = time.monotonic()
    farm_up(layout, 1, "qemu", timeout_s=180)
    print(f"farm up (1 QEMU host): {time.monotonic() - t0:.1f} s")
    rt = client_runtime(load_config(layout.config_file))
    image, vo = choose_image(rt, None, "cms")
    marker = image.spec.readiness.marker or ""
    hc = rt.config.hosts[0]
    conn = LibvirtHost(hc.uri)
    dyn: list[float] = []
    raw: list[float] = []
    try:
        for i in range(a.runs + 1):  # run 0 warms libvirt's caches and is not counted
            t = time.perf_counter()
            inst, _ = submit(rt, image, vo)
            done = wait(rt, inst.id, 120)
            t_dyn = time.perf_counter() - t
            assert done.state.value == "ready", done.reason
            xml = conn.domain_xml(inst.domain_name)
            assert xml is not None
            release(rt, inst.id)
            wait(rt, inst.id, 60, until=ENDED)
            # The same XML under another name: same kernel, initrd, devices, serial logging.
            name = f"raw{i:03d}"
            run_dir = rt.config.storage.shared_dir / "run" / name
            run_dir.mkdir(parents=True, exist_ok=True)
            # No uuid (libvirt makes one) and no dynvm metadata (the agent's reconciler would rightly
            # destroy a dynvm-tagged domain without a record).
            rxml = re.sub(r"<uuid>[^<]*</uuid>", "", xml.replace(inst.id, name))
            rxml = re.sub(r"<metadata[ >].*?</metadata>", "", rxml, flags=re.S)
            assert "instance_id" not in rxml, rxml[:800]
            log = run_dir / f"console-{hc.name}.log"
            t = time.perf_counter()
            conn.define_and_start(f"dynvm-{name}", rxml)
            wait_ready(SerialMarkerProbe(log, marker), time.monotonic() + 120, interval=0.05)
            t_raw = time.perf_counter() - t
            conn.destroy(f"dynvm-{name}")
            conn.undefine(f"dynvm-{name}")
            if i:
                dyn.append(t_dyn)
                raw.append(t_raw)
            print(f"  run {i}: dynvm {t_dyn:.2f} s, raw {t_raw:.2f} s{'  (warm-up)' if not i else ''}")
    finally:
        conn.close()
        farm_down(layout)
    d50, r50 = statistics.median(dyn), statistics.median(raw)
    print(f"dynvm request->ready: p50 {d50:.2f} s, p95 {pct(dyn, 95):.2f} s  ({len(dyn)} runs, cold VM each)")
    print(f"raw define+create+marker: p50 {r50:.2f} s, p95 {pct(raw, 95):.2f} s")
    over = (d50 / r50 - 1) * 100
    print(f"dynvm overhead at p50: {over:+.1f} % (goal < 5 %) -> {'MET' if over < 5 else 'NOT MET'}; "
          f"absolute {1000 * (d50 - r50):+.0f} ms")


if __name__ == "__main__":
    main()
