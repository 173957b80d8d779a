"""Raw libvirt boot of a test image on the QEMU farm: define + create + wait for the readiness marker.

This is the baseline the provisioning benchmark compares against (dynvm request -> ready on the same
image).  Also prints the image build (cold / warm), farm up / down and live-migration figures.

    sudo .venv/bin/python benchmarks/bench_qemu_boot.py [--runs 5] [--image cms-wn] [--cold-build]

Needs root.  Uses DYNVM_TEST_CACHE (default /var/cache/dynvm-test) like the tests; brings up its own farm
there (or reuses one that is up) and takes it down at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provisioner.farm.qemu import QemuFarm
from provisioner.hypervisor.domxml import ChannelSpec, DomainSpec, build_domain_xml
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.probes import SerialMarkerProbe, wait_ready

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def build(out: Path) -> float:
    t = time.monotonic()
    subprocess.run([str(REPO / "images/build/build-test-images.sh"), str(out)], check=True,
                   env={**os.environ, "DYNVM_DEB_CACHE": str(CACHE / "debs")}, capture_output=True)
    return time.monotonic() - t


def xml_for(farm: QemuFarm, art: Path, host: str, name: str, image: str) -> str:
    return build_domain_xml(DomainSpec(
        name=name, uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"dynvm-bench/{name}")), domain_type="qemu",
        vcpus=1, memory_mib=256, kernel=str(art / "test/vmlinux"),
        initrd=str(art / f"test/{image}.initrd.gz"), cmdline="console=ttyS0 quiet panic=-1",
        serial_log=str(farm.serial_log_path(host, name)), console_pty=False,
        channel=ChannelSpec(path=str(farm.channel_path(host, name)), name="org.dynvm.exec.0"),
    ))


def boot_once(
    farm: QemuFarm, conn: LibvirtHost, art: Path, host: str, name: str, image: str
) -> tuple[float, float]:
    """(seconds to define+create, seconds to the readiness marker), both from the define call."""
    farm.serial_log_path(host, name).unlink(missing_ok=True)
    t0 = time.monotonic()
    conn.define_and_start(name, xml_for(farm, art, host, name, image))
    t1 = time.monotonic()
    ready = wait_ready(SerialMarkerProbe(farm.serial_log_path(host, name), f"DYNVM_READY {image}"),
                       t0 + 120, interval=0.02)
    return t1 - t0, ready - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", default="cms-wn")
    ap.add_argument("--cold-build", action="store_true", help="also time a build into an empty dir")
    ap.add_argument("--keep", action="store_true", help="leave the farm up")
    args = ap.parse_args()
    art = CACHE / "images"
    if args.cold_build:
        with tempfile.TemporaryDirectory() as tmpdir:
            print(f"image build cold (kernel .deb cached): {build(Path(tmpdir)):.2f} s")
    build(art)
    print(f"image build warm (no-op):               {build(art):.3f} s")
    farm = QemuFarm(CACHE / "farm", 3)
    farm.down()
    t = time.monotonic()
    farm.up()
    print(f"farm up (3 hosts):                       {time.monotonic() - t:.3f} s")
    host = "hv1"
    conn = LibvirtHost(farm.host_uri(host), call_timeout_s=120)
    defines: list[float] = []
    readies: list[float] = []
    try:
        for i in range(args.runs + 1):
            name = f"bench-{i}"
            d, r = boot_once(farm, conn, art, host, name, args.image)
            conn.destroy(name)
            conn.undefine(name)
            if i == 0:
                print(f"first boot on a fresh host:              define+create {d:.3f} s, marker {r:.2f} s")
                continue
            defines.append(d)
            readies.append(r)
        print(f"define+create ({args.runs} runs):  p50 {statistics.median(defines):.3f} s  "
              f"p95 {pct(defines, 95):.3f} s")
        print(f"boot to marker ({args.runs} runs): p50 {statistics.median(readies):.2f} s  "
              f"p95 {pct(readies, 95):.2f} s  (min {min(readies):.2f}, max {max(readies):.2f})")
        migrate(farm, conn, art, args.image)
    finally:
        conn.close()
        if not args.keep:
            t = time.monotonic()
            farm.down()
            print(f"farm down:                               {time.monotonic() - t:.3f} s")
    return 0


def migrate(farm: QemuFarm, src: LibvirtHost, art: Path, image: str) -> None:
    """Live-migrate one running guest around the hosts a few times; print the time per hop."""
    name = "bench-mig"
    boot_once(farm, src, art, "hv1", name, image)
    conns = {h: LibvirtHost(farm.host_uri(h), call_timeout_s=120) for h in farm.hosts}
    hops: list[float] = []
    at = "hv1"
    try:
        for dest in ["hv2", "hv3", "hv1", "hv2", "hv3"]:
            t = time.monotonic()
            conns[at].migrate(name, conns[dest], xml=xml_for(farm, art, dest, name, image),
                              migrate_uri=farm.migration_uri(dest))
            hops.append(time.monotonic() - t)
            at = dest
        print(f"live migration (256 MiB, {len(hops)} hops):  p50 {statistics.median(hops):.2f} s  "
              f"max {max(hops):.2f} s")
    finally:
        conns[at].destroy(name)
        conns[at].undefine(name)
        for c in conns.values():
            c.close()


if __name__ == "__main__":
    sys.exit(main())
