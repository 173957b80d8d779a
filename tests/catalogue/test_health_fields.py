"""The health probe of a catalogue version: its fields, their defaults and what is refused (one located
line each, as for every catalogue error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.catalogue.files import parse_family
from provisioner.catalogue.model import ProbeType
from provisioner.errors import CatalogueError
from tests.catalogue.helpers import IMAGES

BASE = """schema_version: 1
name: svc
kind: service
ha:
  max_restarts: 2
versions:
  - version: "1"
    boot:
      kernel: {path: test/vmlinux, sha256: local}
    exec:
      method: EXEC_METHOD
HEALTH
"""


def family(tmp_path: Path, health: str, method: str = "serial") -> Path:
    p = tmp_path / "svc.yaml"
    p.write_text(BASE.replace("EXEC_METHOD", method).replace("HEALTH", health))
    return p


def test_shipped_service_images_carry_a_health_probe_of_each_network_kind() -> None:
    kinds = {}
    for name in ("ce", "se", "wms"):
        spec = parse_family(IMAGES / f"{name}.yaml").family.versions[-1]
        assert spec.health is not None, name
        assert spec.health.timeout_s <= 10 and spec.health.failures >= 2, name
        kinds[name] = spec.health.type
    assert kinds == {"ce": ProbeType.GUEST_AGENT, "se": ProbeType.TCP, "wms": ProbeType.EXEC}


def test_defaults_when_only_the_kind_is_given(tmp_path: Path) -> None:
    v = parse_family(family(tmp_path, "    health: {type: guest_agent}")).family.versions[0]
    assert v.health is not None
    assert (v.health.failures, v.health.interval_s) == (3, 1.0)
    v = parse_family(family(tmp_path, "")).family.versions[0]
    assert v.health is None  # no health probe: the VM is never judged unhealthy


@pytest.mark.parametrize(
    ("health", "method", "message"),
    [
        ("    health: {type: serial_marker, marker: X}", "serial", "health.type: a serial marker"),
        ("    health: {type: tcp, port: 80, failures: 0}", "serial", "failures"),
        ("    health: {type: tcp, port: 80, failures: 101}", "serial", "failures"),
        ("    health: {type: tcp, port: 80, timeout_s: 301}", "serial", "health.timeout_s: at most 300"),
        ("    health: {type: tcp, port: 80, interval_s: 0}", "serial", "interval_s"),
        ("    health: {type: tcp}", "serial", "a tcp probe needs 'port'"),
        ("    health: {type: exec}", "serial", "an exec probe needs 'command'"),
        ("    health: {type: guest_agent}", "ssh", "runs through the serial exec channel"),
        ('    health: {type: exec, command: ["true"]}', "none", "runs through the serial exec channel"),
        ("    health: {type: guest_agent, period: 3}", "serial", "period"),
    ],
)
def test_refused_with_a_located_message(tmp_path: Path, health: str, method: str, message: str) -> None:
    with pytest.raises(CatalogueError) as err:
        parse_family(family(tmp_path, health, method))
    text = str(err.value)
    assert message in text and "svc.yaml:" in text and "\n" not in text.strip()
