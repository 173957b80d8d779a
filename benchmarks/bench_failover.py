"""Host failover on the real QEMU farm, beside the seed's figures and Pacemaker run in the same session.

    sudo .venv/bin/python benchmarks/bench_failover.py [--trials 5] [--sizes 1,5]
        [--classes critical,fast,standard] [--cpu-readback x86|generic]
        [--pacemaker 'PROFILES=tuned GUESTS="1 3"'] [--no-pacemaker]

A 4-host QEMU farm (its own directory, two monitors) whose hosts carry the detection classes in turn
(hv1 critical, hv2 fast, hv3 standard, hv4 critical).  One trial: N service VMs (CE, SE, WMS, ...) are
started on the victim (the host of the class under test) and become ready; after a random part of the
victim's lease-renewal period (seeded) ``farm kill`` SIGKILLs its agent, watchdog, libvirtd, virtlockd and
guests at t = 0; the clock stops when every one of them is *running* in
libvirt on a survivor (polled every 20 ms, as the Pacemaker harness polls every 50 ms) and when every one
is *ready* (its readiness probe passed, as recorded by its agent).  The host is then revived and rejoined
by the operator path, the VMs released.  Sizes alternate trial by trial (the same load for both); the
first trial of each class and size is a warm-up, not counted.  Each trial also prints where its time went:
the survivors used and, per VM, when its agent took the boot, when it ran, when it was ready.

Then the Pacemaker peer (/work/shared/peers/pacemaker/run.sh: 3 nodes, Corosync + VirtualDomain, real
fencing, nodes killed the same way) runs in this session with the profiles and guest counts given, and one
table is printed: seed figures, Pacemaker, dynvm.  Goal: critical class, 5 VMs per host, median under 3 s
to running, below tuned Pacemaker, the 5-VM median within 20 % of the 1-VM median.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ha.recovery import RecoveryStore, Step
from provisioner.configload import load_config
from provisioner.control.client import ENDED, choose_image, client_runtime, release, submit, wait
from provisioner.farm.hostkill import farm_kill, farm_revive
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.model import HostState, InstanceState
from provisioner.runtime import Runtime

CACHE = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))
PEER = Path(os.environ.get("DYNVM_PACEMAKER_PEER", "/work/shared/peers/pacemaker"))
HOST_CLASSES = ["critical", "fast", "standard", "critical"]
IMAGES = ["ce", "se", "wms", "se", "wms"]  # one CE per host (its anti-affinity group)
POLL_S = 0.02
# A host dies at a random moment of its agent's lease-renewal cycle (a third of the lease), drawn from one
# seeded stream: without it the kill came at a fixed phase after the set-up's last ready, and that phase
# differed by size (fast class: declared dead 2.0-2.15 s after 1-VM kills, 2.52-2.60 s after 5-VM kills).
KILL_PHASE = random.Random(20261201)

@dataclass
class Trial:
    klass: str
    size: int
    running_s: float
    ready_s: float
    steps: dict[str, float] = field(default_factory=dict)  # recovery step -> seconds after the kill
    vms: list[dict[str, Any]] = field(default_factory=list)  # per VM: survivor, booting/running/ready times


def victim_of(klass: str) -> str:
    return f"hv{HOST_CLASSES.index(klass) + 1}"


def rejoin(rt: Runtime, host: str) -> None:
    cur = rt.store.require_host(host)
    if cur.state in (HostState.DEAD, HostState.FENCED):
        rt.store.set_host_state(host, HostState.UP, expected=cur.state, reason="bench rejoin", operator=True)


def settle(rt: Runtime, recs: RecoveryStore, host: str, timeout_s: float = 180) -> None:
    """Before the next trial: the host is up with its lease and its recovery closed, and stays so for two
    detection periods (seen: a host rejoined right after its revival declared dead again a moment later,
    and the next trial's set-up found it fenced; cause fixed in dd1570f — the leader judged the rejoined host
    on its renewal from before its death — this wait stays as a safety net)."""
    dc = rt.config.detection_classes[rt.config.host(host).detection_class]  # type: ignore[union-attr]
    window = 2 * dc.dead_after_s * dc.samples
    deadline = time.monotonic() + timeout_s
    stable_since: float | None = None
    while True:
        rejoin(rt, host)
        rec = recs.get(host)
        closed = rec is None or rec.step is Step.CLOSED
        ok = closed and rt.store.require_host(host).state is HostState.UP and rt.store.lease_alive(host)
        now = time.monotonic()
        stable_since = (stable_since or now) if ok else None
        if stable_since is not None and now - stable_since >= window:
            return
        if now > deadline:
            raise SystemExit(f"{host} did not settle after the trial: recovery {rec and rec.step}, "
                             f"state {rt.store.require_host(host).state.value}")
        time.sleep(0.1)


def trial(rt: Runtime, layout: FarmLayout, klass: str, size: int, n: int) -> Trial:
    victim = victim_of(klass)
    insts = []
    for k in range(size):
        img, _ = choose_image(rt, IMAGES[k % len(IMAGES)], None)
        inst, _ = submit(rt, img, None, service=f"b{n}-{k}", ip=f"10.77.0.{100 + k}", host=victim)
        insts.append(inst)
    for i in insts:
        done = wait(rt, i.id, 300)
        if done.state is not InstanceState.READY or done.host != victim:
            raise SystemExit(f"set-up: {i.id} is {done.state.value} on {done.host}: {done.reason}")
    recs = RecoveryStore(rt.store.r, rt.store.keys.prefix)
    conns = {h.name: LibvirtHost(h.uri) for h in rt.config.hosts if h.name != victim}
    running: dict[str, float] = {}
    ready: dict[str, float] = {}
    booting: dict[str, float] = {}  # the survivor's agent took the boot (record seen booting)
    where: dict[str, str] = {}
    domain = {i.id: i.domain_name for i in insts}
    dc = rt.config.detection_classes[klass]
    time.sleep(KILL_PHASE.uniform(0, dc.lease_ttl_s / 3))  # not synchronisation: the moment of death
    try:
        t0 = farm_kill(layout, victim)["killed_at"]
        deadline = time.monotonic() + 300
        while len(ready) < size or len(running) < size:
            if time.monotonic() > deadline:
                raise SystemExit(f"{klass}/{size}: not back after 300 s (running {running}, ready {ready})")
            # One libvirt call per survivor with a VM still to come up (listAllDomains(RUNNING), as the
            # Pacemaker harness polls), not one lookup per VM: the poller must not load the libvirtds it
            # is timing (5 VMs x 2 calls every 20 ms were ~500 calls/s into daemons busy starting them).
            pending: dict[str, list[str]] = {}
            for i in insts:
                if i.id in ready:
                    continue
                rec = rt.store.require_instance(i.id)
                if rec.host is None or rec.host == victim:
                    continue
                now = time.time()
                where[i.id] = rec.host
                if i.id not in booting and rec.state is not InstanceState.PLACED:
                    booting[i.id] = now - t0
                if rec.state is InstanceState.READY:
                    ready[i.id] = now - t0
                    running.setdefault(i.id, now - t0)
                elif i.id not in running:
                    pending.setdefault(rec.host, []).append(i.id)
            for host, ids in pending.items():
                up = conns[host].running_names()
                now = time.time()
                for iid in ids:
                    if domain[iid] in up:
                        running.setdefault(iid, now - t0)
            time.sleep(POLL_S)
        recovery = recs.get(victim)
        steps = {k: round(v - t0, 3) for k, v in (recovery.times.items() if recovery else [])}
    finally:
        for c in conns.values():
            c.close()
    farm_revive(layout, victim, timeout_s=120)
    rejoin(rt, victim)
    settle(rt, recs, victim)
    for i in insts:
        release(rt, i.id)
    for i in insts:
        wait(rt, i.id, 120, until=ENDED)
    vms = [{"host": where.get(i.id), "booting": round(booting.get(i.id, -1), 3),
            "running": round(running[i.id], 3), "ready": round(ready[i.id], 3)} for i in insts]
    return Trial(klass, size, max(running.values()), max(ready.values()), steps, vms)


def breakdown(tr: Trial) -> str:
    """Where a trial's time went: survivors used, and per VM (start order) booting/running/ready."""
    hosts: dict[str, int] = {}
    for v in tr.vms:
        hosts[str(v["host"])] = hosts.get(str(v["host"]), 0) + 1
    per = ", ".join(f"{v['host']} {v['booting']:.2f}/{v['running']:.2f}/{v['ready']:.2f}"
                    for v in sorted(tr.vms, key=lambda v: float(v["running"])))
    return f"    survivors {hosts}; per VM booting/running/ready: {per}"


def pacemaker(env_text: str, trials: int) -> list[dict[str, Any]]:
    """Run the peer harness; its per-trial records for this run."""
    run_id = time.strftime("dynvm-%Y%m%dT%H%M%SZ", time.gmtime())
    env = dict(os.environ, RUN_ID=run_id)
    if shutil.which("pacemakerd"):
        env["SKIP_INSTALL"] = "1"  # else run.sh installs the Debian packages itself (apt-get)
    for word in shlex.split(env_text):
        k, _, v = word.partition("=")
        env[k] = v
    print(f"pacemaker peer: {env_text} ./run.sh {trials} (run {run_id}) ...", flush=True)
    t = time.monotonic()
    p = subprocess.run([str(PEER / "run.sh"), str(trials)], env=env, cwd=PEER, capture_output=True, text=True)
    print(f"pacemaker peer: exit {p.returncode} after {time.monotonic() - t:.0f} s", flush=True)
    if p.returncode != 0:
        print("  " + "\n  ".join(p.stdout.strip().splitlines()[-5:]), flush=True)
    return peer_results(run_id)


def peer_results(run_id: str) -> list[dict[str, Any]]:
    out = []
    for line in (PEER / "results.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("run_id") == run_id and rec.get("ok"):
            out.append(rec)
    return out


def row(system: str, what: str, size: str, running: list[float], ready: list[float]) -> str:
    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs):6.2f} {max(xs):6.2f}" if xs else f"{'-':>6} {'-':>6}"

    n = max(len(running), len(ready))
    return f"| {system:<34} | {what:<22} | {size:>3} | {n:>2} | {fmt(running)} | {fmt(ready)} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--sizes", default="1,5")
    ap.add_argument("--classes", default="critical,fast,standard")
    # shlex words: a value with a space is quoted (unquoted, "GUESTS=1 3" ran the 1-guest block only).
    ap.add_argument("--pacemaker", default='PROFILES=tuned GUESTS="1 3"', help="env for the peer's run.sh")
    ap.add_argument("--pacemaker-trials", type=int, default=5)
    ap.add_argument("--no-pacemaker", action="store_true")
    ap.add_argument("--pacemaker-run", metavar="RUN_ID",
                    help="use this earlier run of the peer (results.jsonl) instead of running it")
    ap.add_argument("--watchdog", type=float, default=1.0,
                    help="ha.watchdog_s (the restart waits max(lease, watchdog) + margin after the last "
                         "renewal; the farm's default is 2.0)")
    ap.add_argument("--margin", type=float, default=0.5, help="ha.safety_margin_s")
    ap.add_argument("--cpu-readback", choices=["x86", "generic"], default="x86",
                    help="guest_cpu_readback (generic: libvirt 9.0's default, ~0.25 s more QEMU CPU a start)")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    classes = a.classes.split(",")
    layout = FarmLayout(CACHE / "bench-failover")
    farm_down(layout)
    built = CACHE / "dynvm-farm" / "shared" / "images"
    if built.is_dir() and not (layout.shared / "images").exists():
        layout.shared.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(built), str(layout.shared / "images")], check=True)
    print(f"ha: watchdog_s {a.watchdog}, safety_margin_s {a.margin}", flush=True)
    print(f"guest_cpu_readback: {a.cpu_readback}", flush=True)
    farm_up(layout, 4, "qemu", timeout_s=300, host_classes=HOST_CLASSES,
            ha={"watchdog_s": a.watchdog, "safety_margin_s": a.margin},
            settings={"guest_cpu_readback": a.cpu_readback})
    rt = client_runtime(load_config(layout.config_file))
    results: list[Trial] = []
    n = 0
    try:
        for klass in classes:
            dc = rt.config.detection_classes[klass]
            # Sizes interleaved (1, 5, 1, 5, ...): the machine's load drifts (other farms come and go), so
            # consecutive blocks of one size would compare different conditions.  Round 0 of every size is
            # a warm-up: the first start on a libvirtd host pays its capabilities cache (~4 s), and a
            # 1-VM warm-up touches one survivor only, so the 5-VM warm-up warms the others.
            for t in range(a.trials + 1):
                for size in sizes:
                    n += 1
                    tr = trial(rt, layout, klass, size, n)
                    warm = t == 0
                    print(f"{klass:<8} ({dc.dead_after_s:g} s x{dc.samples}) {size} VM(s) trial {t}: "
                          f"running {tr.running_s:.2f} s, ready {tr.ready_s:.2f} s, steps {tr.steps}"
                          f"{'  (warm-up, not counted)' if warm else ''}", flush=True)
                    print(breakdown(tr), flush=True)
                    if not warm:
                        results.append(tr)
    finally:
        farm_down(layout)
    if a.pacemaker_run:
        peer = peer_results(a.pacemaker_run)
    else:
        peer = [] if a.no_pacemaker else pacemaker(a.pacemaker, a.pacemaker_trials)
    table(rt, classes, sizes, results, peer)


def table(rt: Runtime, classes: list[str], sizes: list[int], results: list[Trial],
          peer: list[dict[str, Any]]) -> None:
    print()
    print("| system                             | detection              | VMs |  n | running med    max "
          "| ready med    max |")
    print("|---|---|---|---|---|---|")
    print(f"| {'seed (Nagios+Cfengine+Xen, 2007)':<34} | {'20 / 40 / 60 s classes':<22} |   - |  - | "
          f"{'50 s - 3.5 min':>13} | {'-':>13} |")
    for prof in sorted({r["profile"] for r in peer}):
        for g in sorted({r["guests"] for r in peer if r["profile"] == prof}):
            rs = [r for r in peer if r["profile"] == prof and r["guests"] == g]
            print(row(f"Pacemaker+Corosync ({prof})", "token loss + fencing", str(g),
                      [r["all_running"] for r in rs], [r["all_marker"] for r in rs if r.get("all_marker")]))
    for klass in classes:
        dc = rt.config.detection_classes[klass]
        for size in sizes:
            ts = [r for r in results if r.klass == klass and r.size == size]
            what = f"{klass} ({dc.dead_after_s:g} s x{dc.samples})"
            print(row("dynvm", what, str(size), [r.running_s for r in ts], [r.ready_s for r in ts]))
    crit = {s: [r.running_s for r in results if r.klass == "critical" and r.size == s] for s in sizes}
    if crit.get(5) and crit.get(1):
        m5, m1 = statistics.median(crit[5]), statistics.median(crit[1])
        verdict = "MET" if m5 < 3 else "NOT MET"
        print(f"\ncritical, 5 VMs: median {m5:.2f} s to running (goal < 3 s: {verdict}); "
              f"5-VM vs 1-VM median {100 * (m5 / m1 - 1):+.0f} % (goal within 20 %)")
    print("ready = the image's readiness probe passed (includes the TCG guest boot, like Pacemaker's marker)")
    print(f"dynvm guest_cpu_readback: {rt.config.guest_cpu_readback} (x86: libvirt reads a started guest's "
          "CPU back in 2 QMP calls, not ~415; provisioner/hypervisor/domxml.py)")


if __name__ == "__main__":
    main()
