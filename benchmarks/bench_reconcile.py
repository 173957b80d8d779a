"""Cost of one reconcile pass and of one compare-and-set transition (real Redis, libvirt's test driver).

    python benchmarks/bench_reconcile.py [--vms 200] [--passes 20] [--compare-rev REV]

Starts a private redis-server, defines ``--vms`` running dynvm domains on an in-process test-driver host
with their records READY on it (plus as many claims), then prints the median and p99 of a full
``reconcile_host`` pass, and p50/p99 of ``transition_from`` (READY <-> DRAINING).  With ``--compare-rev``
the reconciler of that git revision (provisioner/agent/reconcile.py) is timed on the same world first,
for a before/after figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from provisioner.catalogue.store import Catalogue  # noqa: E402
from provisioner.config import Config, HostConfig  # noqa: E402
from provisioner.hypervisor.domxml import DomainSpec, build_domain_xml  # noqa: E402
from provisioner.hypervisor.libvirt_host import LibvirtHost  # noqa: E402
from provisioner.hypervisor.testdriver import write_test_host_xml  # noqa: E402
from provisioner.model import Capacity, Host, Instance, InstanceState, Role  # noqa: E402
from provisioner.runtime import Runtime  # noqa: E402
from provisioner.state import StateStore  # noqa: E402
from tests.redisproc import PrivateRedis  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def build_world(d: Path, url: str, vms: int) -> Runtime:
    uri = write_test_host_xml(d / "hv1.xml", cpus=4 * vms, memory_mib=512 * vms)
    cfg = Config(redis_url=url, domain_type="test", catalogue_dir=d, hosts=[HostConfig(name="hv1", uri=uri)])
    store = StateStore(url)
    store.register_host(Host("hv1", uri, capacity=Capacity(4 * vms, 512 * vms)))
    store.renew_lease("hv1", "bench", 3600)
    hv = LibvirtHost(uri)
    for n in range(vms):
        iid = f"b{n:05d}"
        store.create_instance(Instance(iid, Role.WORKER, "cms-wn:1", 1, 256, created=time.time()))
        assert store.claim("hv1", iid, 1, 256, require_lease=False)
        read = store.transition_from(
            store.require_instance(iid), InstanceState.PLACED, bump_epoch=True, host="hv1"
        )
        store.transition_from(store.transition_from(read, InstanceState.BOOTING), InstanceState.READY)
        spec = DomainSpec(
            name=f"dynvm-{iid}",
            uuid=str(uuid.uuid4()),
            domain_type="test",
            vcpus=1,
            memory_mib=256,
            console_pty=False,
            metadata={"instance_id": iid},
        )
        hv.define_and_start(spec.name, build_domain_xml(spec))
    return Runtime(config=cfg, store=store, catalogue=Catalogue(d, d, {}), host="hv1", hypervisor=hv)


def load_reconcile(rev: str) -> ModuleType:
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:provisioner/agent/reconcile.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "reconcile_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("reconcile_old", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reconcile_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def time_passes(fn, rt: Runtime, passes: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(passes):
        t0 = time.perf_counter()
        d = fn(rt)
        out.append((time.perf_counter() - t0) * 1000)
        assert not d.orphans and not d.ghosts, "the benchmark world must be consistent"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--compare-rev", default=None)
    args = ap.parse_args()
    from provisioner.agent.reconcile import reconcile_host

    with tempfile.TemporaryDirectory() as tmp:
        server = PrivateRedis(Path(tmp)).start()
        url = server.url
        try:
            rt = build_world(Path(tmp), url, args.vms)
            if args.compare_rev:
                old = time_passes(load_reconcile(args.compare_rev).reconcile_host, rt, args.passes)
                print(
                    f"reconcile pass ({args.compare_rev}), {args.vms} VMs: "
                    f"p50 {statistics.median(old):.1f} ms  p99 {pct(old, 99):.1f} ms"
                )
            new = time_passes(reconcile_host, rt, args.passes)
            print(
                f"reconcile pass (working tree), {args.vms} VMs: "
                f"p50 {statistics.median(new):.1f} ms  p99 {pct(new, 99):.1f} ms"
            )
            lat = []
            read = rt.store.require_instance("b00000")
            for n in range(2000):
                target = InstanceState.DRAINING if n % 2 == 0 else InstanceState.READY
                t0 = time.perf_counter()
                read = rt.store.transition_from(read, target)
                lat.append((time.perf_counter() - t0) * 1000)
            print(
                f"transition_from (CAS on state+host+epoch): p50 {statistics.median(lat):.3f} ms  "
                f"p99 {pct(lat, 99):.3f} ms"
            )
            assert rt.hypervisor is not None
            rt.hypervisor.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
