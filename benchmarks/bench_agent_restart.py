"""Restarting only an agent: how long until the successor holds the host's lease, and how long it lapsed.

    .venv/bin/python benchmarks/bench_agent_restart.py [--trials 7] [--class fast|standard|slow]

A private redis-server and real ``dynvm agent --host hv1`` processes on the libvirt test driver.  Each trial
SIGKILLs the agent and starts a new one at once (as the farm supervisor does), then polls the lease every
5 ms: time from the kill to the successor holding the lease, and the longest time the lease was absent
(the host looked dead).  Two modes: with the dead agent's record (the handover by compare-and-set) and
without it (the record removed: the successor waits for the old lease to expire, as before the handover).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's tests/ (redisproc)

from provisioner.config import checkout_images_dir
from provisioner.hypervisor.testdriver import write_test_host_xml
from provisioner.state import StateStore
from tests.redisproc import PrivateRedis


def agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "provisioner.cli.main", "--config", str(cfg), "agent", "--host", "hv1"]
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def trial(
    store: StateStore, cfg: Path, log: Path, proc: subprocess.Popen[bytes], record: Path | None
) -> tuple[subprocess.Popen[bytes], float, float]:
    old = store.lease_holder("hv1")
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    if record is not None:
        record.unlink(missing_ok=True)
    new = agent(cfg, log)
    gap_start: float | None = None
    gap = 0.0
    while True:
        h = store.lease_holder("hv1")
        now = time.monotonic()
        if h is None and gap_start is None:
            gap_start = now
        if h is not None and gap_start is not None:
            gap, gap_start = max(gap, now - gap_start), None
        if h not in (None, old):
            return new, now - t0, gap
        if now - t0 > 120:
            raise SystemExit(f"no successor lease after 120 s (see {log})")
        time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--class", dest="klass", default="fast", choices=["fast", "standard", "slow"])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (agent logs)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between a restart and the next kill")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-restart-"))
    red = PrivateRedis(tmp).start()
    url = red.url
    uri = write_test_host_xml(tmp / "hv1.xml", cpus=8, memory_mib=8192)
    cfg = tmp / "dynvm.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "redis_url": url,
                "catalogue_dir": str(checkout_images_dir()),
                "domain_type": "test",
                "storage": {"shared_dir": str(tmp / "shared")},
                "ha": {"run_dir": str(tmp / "run")},
                "hosts": [{"name": "hv1", "uri": uri, "detection_class": args.klass}],
            }
        )
    )
    log = tmp / "agents.log"
    record = tmp / "run" / "agent-hv1.json"
    try:
        time.sleep(0.3)
        store = StateStore(url)
        proc = agent(cfg, log)
        deadline = time.monotonic() + 60
        while not record.exists() or store.lease_holder("hv1") is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"first agent not up (see {log})")
            time.sleep(0.05)
        ttl = {"fast": 2.0, "standard": 3.0, "slow": 10.0}[args.klass]
        print(f"agent restart, detection class {args.klass} (lease TTL {ttl} s), {args.trials} trials each")
        print(f"{'mode':<28}{'kill->lease median':>20}{'max':>8}{'lapse median':>14}{'max':>8}")
        for mode, rec in (("handover (record kept)", None), ("no record (old path)", record)):
            took, gaps = [], []
            for _ in range(args.trials):
                while not record.exists():  # the new agent writes its record once it holds the lease
                    time.sleep(0.02)
                proc, t, g = trial(store, cfg, log, proc, rec)
                took.append(t)
                gaps.append(g)
                time.sleep(max(ttl, args.settle))  # let the new agent settle (serving) before the next kill
            print(
                f"{mode:<28}{statistics.median(took):>19.2f}s{max(took):>7.2f}s"
                f"{statistics.median(gaps):>13.2f}s{max(gaps):>7.2f}s"
            )
        proc.terminate()
        proc.wait(timeout=20)
    finally:
        red.kill()
        print(f"logs: {log}") if "--keep" in sys.argv else shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
