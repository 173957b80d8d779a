"""Streaming payload output on a real QEMU (TCG) guest (issue #8): throughput and line latency.

    python benchmarks/bench_exec_stream.py [--mib 16] [--lines 40] [--runs 3]

Starts its own 1-host QEMU farm under $DYNVM_TEST_CACHE/bench-stream-farm (root), provisions one CMS worker
VM and talks to its exec channel exactly as the payload wrapper does (provisioner.execchan.stream_in_guest):
  * throughput: ``head -c N /dev/zero`` streamed to a sink (a file), MiB/s from the RUN request to the exit
    (best and median of --runs), beside the guest's own ``head | base64 > /dev/null`` cost and the old
    one-shot protocol's (whole output at the end, 1 MiB cap) for 1 MiB;
  * latency: the payload prints its /proc/uptime (10 ms steps; busybox date has no %N) every 0.25 s; each
    line's arrival on the host minus its guest time gives latency + clock offset; the offset is bracketed
    by one-shot uptime probes before and after (a probe's reply is between its send and receive), so each
    latency is known within the probes' round trip: prints p50/p90 of the bracket's midpoint and the
    bracket half-width.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provisioner.configload import load_config
from provisioner.control.client import ENDED, choose_image, client_runtime, release, submit, wait
from provisioner.execchan.client import exec_socket, run_in_guest, stream_in_guest
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down, farm_up
from provisioner.model import InstanceState


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def offset_bounds(sock: Path, probes: int = 5) -> tuple[float, float]:
    """host_time - guest_time lies in [lo, hi] (tightest of several one-shot probes)."""
    lo, hi = float("-inf"), float("inf")
    for _ in range(probes):
        a = time.time()
        res = run_in_guest(sock, ["cut", "-d", " ", "-f1", "/proc/uptime"], timeout=60)
        b = time.time()
        g = float(res.stdout.strip())
        lo, hi = max(lo, a - g), min(hi, b - g)
    return lo, hi


def throughput(sock: Path, mib: int, runs: int) -> None:
    n = mib * 1024 * 1024
    rates: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryFile() as f:
            t0 = time.monotonic()
            res = stream_in_guest(sock, ["head", "-c", str(n), "/dev/zero"], timeout=3600, out=f.write,
                                  err=f.write)
            dt = time.monotonic() - t0
            assert res.exit_code == 0 and res.out_bytes == n, res
        rates.append(mib / dt)
    t0 = time.monotonic()
    run_in_guest(sock, ["sh", "-c", f"head -c {n} /dev/zero | base64 > /dev/null"], timeout=3600)
    local = mib / (time.monotonic() - t0)
    t0 = time.monotonic()
    old = run_in_guest(sock, ["head", "-c", str(1 << 20), "/dev/zero"], timeout=600)
    one_shot = 1 / (time.monotonic() - t0)
    assert old.exit_code == 0 and len(old.stdout) == 1 << 20
    print(f"throughput {mib} MiB stdout: best {max(rates):.2f} MiB/s, median {statistics.median(rates):.2f} "
          f"MiB/s over {runs} runs (guest-only head|base64 {local:.2f} MiB/s; the one-shot protocol, output "
          f"at the end and capped at 1 MiB: {one_shot:.2f} MiB/s for 1 MiB)")


def latency(sock: Path, lines: int) -> None:
    lo1, hi1 = offset_bounds(sock)
    arrivals: list[tuple[float, bytes]] = []
    buf = bytearray()

    def out(data: bytes) -> None:
        now = time.time()
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            arrivals.append((now, line))

    script = (f"i=0; while [ $i -lt {lines} ]; do read u _ < /proc/uptime; echo $u; sleep 0.25; "
              "i=$((i+1)); done")
    res = stream_in_guest(sock, script=script, timeout=600, out=out, err=lambda d: None)
    assert res.exit_code == 0 and len(arrivals) == lines, (res, len(arrivals))
    lo2, hi2 = offset_bounds(sock)
    lo, hi = max(lo1, lo2), min(hi1, hi2)
    if lo > hi:  # the clocks drifted apart between the probes: fall back to the wider bracket
        lo, hi = min(lo1, lo2), max(hi1, hi2)
    mid = (lo + hi) / 2
    lats = [(h - float(g)) - mid for h, g in arrivals]
    print(f"latency guest print -> host sink over {lines} lines: p50 {pct(lats, 50) * 1000:.0f} ms, "
          f"p90 {pct(lats, 90) * 1000:.0f} ms, max {max(lats) * 1000:.0f} ms "
          f"(clock offset known within +/-{(hi - lo) / 2 * 1000:.0f} ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--lines", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    cache = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))
    layout = FarmLayout(cache / "bench-stream-farm")
    farm_down(layout)
    farm_up(layout, 1, "qemu", timeout_s=180)
    try:
        config = load_config(layout.config_file)
        rt = client_runtime(config)
        img, vo = choose_image(rt, None, "cms")
        inst, _ = submit(rt, img, vo)
        vm = wait(rt, inst.id, 180)
        assert vm.state is InstanceState.READY and vm.host, vm.reason
        sock = exec_socket(config.storage.shared_dir, vm.id, vm.host)
        throughput(sock, args.mib, args.runs)
        latency(sock, args.lines)
        release(rt, vm.id)
        wait(rt, vm.id, 60, until=ENDED)
    finally:
        farm_down(layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
