"""Time one domain's life on libvirt's test driver through LibvirtHost (no QEMU, no daemon).

    .venv/bin/python benchmarks/bench_libvirt.py [--runs 200]

Prints the median and p99 of define+create, destroy, undefine and the whole cycle, plus the cost of the
per-call worker thread (a no-op call) and of a state() query.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provisioner.hypervisor.domxml import DiskSpec, DomainSpec, build_domain_xml
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.hypervisor.testdriver import write_test_host_xml


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return f"median {statistics.median(s) * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        host = LibvirtHost(write_test_host_xml(Path(d) / "host.xml", cpus=16, memory_mib=32768))
        series: list[list[float]] = [[] for _ in range(7)]
        build, start, stop, undef, cycle, noop, state = series
        host.capacity()  # open the connection outside the measurement
        for i in range(args.runs):
            name = f"bench-{i}"
            spec = DomainSpec(
                name=name,
                uuid=str(uuid.uuid4()),
                domain_type="test",
                vcpus=1,
                memory_mib=256,
                disks=(DiskSpec(f"/srv/dynvm/instances/{name}.qcow2"),),
                metadata={"instance_id": name, "role": "worker", "vo": "cms"},
            )
            t0 = time.perf_counter()
            xml = build_domain_xml(spec)
            t1 = time.perf_counter()
            host.define_and_start(name, xml)
            t2 = time.perf_counter()
            host.destroy(name)
            t3 = time.perf_counter()
            host.undefine(name)
            t4 = time.perf_counter()
            build.append(t1 - t0)
            start.append(t2 - t1)
            stop.append(t3 - t2)
            undef.append(t4 - t3)
            cycle.append(t4 - t1)
            noop.append(timed(lambda: host._call("noop", lambda conn: None)))
            state.append(timed(lambda: host.state("absent")))
        host.close()
    print(f"libvirt test driver via LibvirtHost, {args.runs} runs")
    print(f"  build_domain_xml            {ms(build)}")
    print(f"  define_and_start            {ms(start)}")
    print(f"  destroy                     {ms(stop)}")
    print(f"  undefine                    {ms(undef)}")
    print(f"  define+create+destroy+undef {ms(cycle)}")
    print(f"  no-op call (thread + lock)  {ms(noop)}")
    print(f"  state() of missing domain   {ms(state)}")


if __name__ == "__main__":
    main()
