"""Scheduler benchmark: 1,000 hosts holding 10,000 VMs.

    python benchmarks/bench_scheduler.py [--hosts 1000] [--vms 10000] [--runs 2000] [--batch-runs 300]

Goals (issue #3): one placement p99 < 1 ms, a 50-VM batch p99 < 20 ms (index build excluded, reported
separately).  Prints the figures and whether the goals are met; exit status 0 either way (a benchmark
informs, it does not gate).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provisioner.model import Capacity, Host, HostState, Instance, InstanceState, Role, Tier
from provisioner.scheduler import HostIndex, PlacementRequest, SchedulerPolicy, Snapshot, schedule

SINGLE_GOAL_MS = 1.0
BATCH_GOAL_MS = 20.0
TIERS = [Tier.POOL, Tier.WORKER, Tier.WORKER, Tier.WORKER, Tier.NORMAL, Tier.HIGH, Tier.CRITICAL]
VOS = ["cms", "atlas", "lhcb", "alice", "belle"]


def build_snapshot(n_hosts: int, n_vms: int, host_vcpus: int = 64, seed: int = 1) -> Snapshot:
    rnd = random.Random(seed)
    hosts = []
    for i in range(n_hosts):
        state = HostState.UP if rnd.random() > 0.03 else rnd.choice(list(HostState))
        labels = {"rack": f"r{i % 20:02d}", "cpu": rnd.choice(["amd", "intel"])}
        hosts.append(
            Host(f"hv{i:04d}", "test:///default", state, Capacity(host_vcpus, 256 * 1024), labels=labels)
        )
    instances = []
    for j in range(n_vms):
        h = hosts[rnd.randrange(n_hosts)]
        vcpus = rnd.choice([1, 2, 4, 8])
        mem = vcpus * 2048
        if h.used_vcpus + vcpus > h.capacity.vcpus:
            continue
        h.used_vcpus += vcpus
        h.used_memory_mib += mem
        tier = rnd.choice(TIERS)
        role = Role.SERVICE if tier.rank >= 2 else Role.WORKER
        group = f"svc{j % 300}" if role is Role.SERVICE else None
        instances.append(
            Instance(
                f"vm{j:05d}",
                role,
                "img:1",
                vcpus,
                mem,
                InstanceState.READY,
                tier,
                rnd.choice(VOS),
                h.name,
                anti_affinity=group,
            )
        )
    return Snapshot(tuple(hosts), tuple(instances))


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def requests(rnd: random.Random, n: int, tag: str) -> list[PlacementRequest]:
    out = []
    for k in range(n):
        tier = rnd.choice(TIERS)
        labels = {"rack": f"r{rnd.randrange(20):02d}"} if rnd.random() < 0.3 else {}
        out.append(
            PlacementRequest(
                f"{tag}-{k}",
                rnd.choice([1, 2, 4, 8]),
                4096,
                tier,
                rnd.choice(VOS),
                labels,
                anti_affinity=f"svc{rnd.randrange(300)}" if tier.rank >= 2 else None,
            )
        )
    return out


def run(snap: Snapshot, args: argparse.Namespace, title: str) -> None:
    t0 = time.perf_counter()
    index = HostIndex.for_snapshot(snap)
    build_ms = (time.perf_counter() - t0) * 1000
    policy = SchedulerPolicy(vo_quotas={"belle": (100_000, 100_000)})
    rnd = random.Random(7)
    singles = [requests(rnd, 1, f"s{i}") for i in range(args.runs)]
    batches = [requests(rnd, 50, f"b{i}") for i in range(args.batch_runs)]
    for reqs in singles[:50]:  # warm-up: caches of label masks, effective capacity
        schedule(reqs, index, policy)
    single_ms, batch_ms, placed, preempted, unplaced = [], [], 0, 0, 0
    for reqs in singles:
        t = time.perf_counter()
        plan = schedule(reqs, index, policy)
        single_ms.append((time.perf_counter() - t) * 1000)
        placed += len(plan.placements)
    for reqs in batches:
        t = time.perf_counter()
        plan = schedule(reqs, index, policy)
        batch_ms.append((time.perf_counter() - t) * 1000)
        preempted += len(plan.preemptions)
        unplaced += len(plan.unplaced)
    s50, s99 = pct(single_ms, 50), pct(single_ms, 99)
    b50, b99 = pct(batch_ms, 50), pct(batch_ms, 99)
    used = int(index.used_vcpus.sum()) / max(int(index.cap_vcpus.sum()), 1)
    print(
        f"== {title}: {index.n} hosts, {len(snap.instances)} VMs, {int(index.placeable.sum())} hosts up,"
        f" {used:.0%} of vCPUs used"
    )
    print(f"index build: {build_ms:.1f} ms (once per snapshot, excluded below)")
    print(
        f"single placement ({len(single_ms)} runs, {placed} placed): p50 {s50:.3f} ms  p99 {s99:.3f} ms"
        f"  max {max(single_ms):.3f} ms  goal p99 < {SINGLE_GOAL_MS} ms:"
        f" {'MET' if s99 < SINGLE_GOAL_MS else 'MISSED'}"
    )
    print(
        f"50-VM batch ({len(batch_ms)} runs, {preempted} preemptions, {unplaced} unplaced):"
        f" p50 {b50:.2f} ms  p99 {b99:.2f} ms  max {max(batch_ms):.2f} ms"
        f"  goal p99 < {BATCH_GOAL_MS} ms: {'MET' if b99 < BATCH_GOAL_MS else 'MISSED'}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[1])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--batch-runs", type=int, default=300)
    args = ap.parse_args()
    run(build_snapshot(args.hosts, args.vms), args, "site with room (64 vCPU hosts)")
    # Hosts nearly full: most requests go down the preemption and explanation paths.
    run(build_snapshot(args.hosts, args.vms, host_vcpus=24), args, "full site (24 vCPU hosts, preemption)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
