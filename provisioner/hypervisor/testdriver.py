"""Node definitions for libvirt's test driver: one file per simulated host with a known capacity.

``test:///abs/path.xml`` gives every libvirt open() a fresh copy of the node, so the state of such a host
lives as long as one connection (one LibvirtHost) does.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from provisioner.errors import ValidationError


def render_test_host_xml(cpus: int, memory_mib: int) -> str:
    """The node XML of an empty test-driver host with ``cpus`` CPUs and ``memory_mib`` MiB."""
    if not 1 <= cpus <= 4096:
        raise ValidationError(f"cpus: {cpus} is not in [1, 4096]")
    if not 64 <= memory_mib <= 64 * 1024 * 1024:
        raise ValidationError(f"memory_mib: {memory_mib} is not in [64, {64 * 1024 * 1024}]")
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, value in (
        ("mhz", 2000),
        ("model", "x86_64"),
        ("active", cpus),
        ("maxcpus", cpus),
        ("nodes", 1),
        ("sockets", 1),
        ("cores", cpus),
        ("threads", 1),
    ):
        ET.SubElement(cpu, tag).text = str(value)
    ET.SubElement(node, "memory").text = str(memory_mib * 1024)  # KiB
    ET.indent(node, space="  ")
    return ET.tostring(node, encoding="unicode") + "\n"


def write_test_host_xml(path: Path, cpus: int, memory_mib: int) -> str:
    """Write a test-driver node file (atomically) and return its URI ``test:///<absolute path>``."""
    path = path.absolute()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(render_test_host_xml(cpus, memory_mib), encoding="utf-8")
    os.replace(tmp, path)
    return f"test://{path}"
