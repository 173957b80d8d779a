"""Pure parts of the farm's per-host libvirt configuration (no QEMU, no root)."""

from __future__ import annotations

from provisioner.farm.qemu.hostconf import GENERIC_CPU_FETCH_FLAG, without_generic_cpu_fetch

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
