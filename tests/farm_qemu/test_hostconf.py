"""Pure parts of the farm's per-host libvirt configuration (no QEMU, no root)."""

from __future__ import annotations

from pathlib import Path

from provisioner.farm.qemu.farm import QemuFarm
from provisioner.farm.qemu.hostconf import GENERIC_CPU_FETCH_FLAG, HostPaths, without_generic_cpu_fetch

CAPS = f"""<qemuCaps>
  <flag name='query-cpu-definitions'/>
  {GENERIC_CPU_FETCH_FLAG}
  <flag name='cpu-unavailable-features-x'/>
</qemuCaps>
"""


def test_only_the_generic_cpu_fetch_flag_goes() -> None:
    out = without_generic_cpu_fetch(CAPS)
    assert GENERIC_CPU_FETCH_FLAG not in out
    assert "<flag name='query-cpu-definitions'/>" in out and "cpu-unavailable-features-x" in out
    assert without_generic_cpu_fetch(out) == out  # idempotent: a revived host's cache is rewritten as is


def test_what_if_edits_the_cache_and_off_removes_only_its_own_edit(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path / "hv1")
    cache = paths.cache / "qemu" / "capabilities"
    cache.mkdir(parents=True)
    edited, stock = cache / "a.xml", cache / "b.xml"
    edited.write_text(CAPS)
    stock.write_text(without_generic_cpu_fetch(CAPS))  # a QEMU without the capability: not ours to touch
    QemuFarm(tmp_path, 1, x86_cpu_fetch=True)._what_if_caps(paths)
    assert GENERIC_CPU_FETCH_FLAG not in edited.read_text()
    QemuFarm(tmp_path, 1, x86_cpu_fetch=False)._what_if_caps(paths)
    assert not edited.exists() and stock.exists()  # libvirtd probes QEMU afresh: stock libvirt again
    assert sorted(p.name for p in cache.iterdir()) == ["b.xml"]
