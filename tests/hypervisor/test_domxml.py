"""The pure domain XML builder: golden files, validation of every untrusted value, metadata round trip."""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.errors import ValidationError
from provisioner.hypervisor import domxml
from provisioner.hypervisor.domxml import (
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    NicSpec,
    build_domain_xml,
    parse_metadata,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "hypervisor"
UUID = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
META = {
    "instance_id": "i-0001",
    "role": "worker",
    "vo": "cms",
    "owner": "slurm:1234",
    "image": "cms-wn:2026.11.2",
}


def worker_test() -> DomainSpec:
    return DomainSpec(
        name="dynvm-i-0001",
        uuid=UUID,
        domain_type="test",
        vcpus=2,
        memory_mib=2048,
        disks=(DiskSpec("/srv/dynvm/instances/i-0001.qcow2"),),
        metadata=META,
    )


def tcg_direct_boot() -> DomainSpec:
    return DomainSpec(
        name="dynvm-i-0002",
        uuid=UUID,
        domain_type="qemu",
        vcpus=1,
        memory_mib=256,
        kernel="/srv/dynvm/images/vmlinux-6.1",
        initrd="/srv/dynvm/images/initrd.img",
        cmdline="console=ttyS0 root=/dev/vda rw quiet",
        disks=(
            DiskSpec("/srv/dynvm/instances/i-0002.qcow2"),
            DiskSpec(
                "/srv/dynvm/images/scratch.raw", format="raw", target="vdb", readonly=True, shareable=True
            ),
        ),
        serial_log="/var/log/dynvm/i-0002.log",
        channel=ChannelSpec("/run/dynvm/i-0002.sock"),
        metadata={**META, "instance_id": "i-0002"},
    )


def service_bridge() -> DomainSpec:
    return DomainSpec(
        name="ce-01",
        uuid=UUID,
        domain_type="kvm",
        vcpus=4,
        memory_mib=8192,
        disks=(
            DiskSpec("/srv/dynvm/instances/ce-01.qcow2"),
            DiskSpec("/srv/dynvm/instances/ce-01.data.qcow2", target="vdb"),
        ),
        serial_log="/var/log/dynvm/ce-01.log",
        console_pty=False,
        nics=(NicSpec("52:54:00:12:34:56", bridge="br-site"),),
        metadata={"instance_id": "svc-ce-01", "role": "service", "owner": "ce-01", "image": "ce:1.4"},
    )


@pytest.mark.parametrize("factory", [worker_test, tcg_direct_boot, service_bridge])
def test_golden(factory) -> None:  # type: ignore[no-untyped-def]
    golden = DATA / f"{factory.__name__}.xml"
    xml = build_domain_xml(factory())
    if os.environ.get("DYNVM_UPDATE_GOLDEN"):
        golden.write_text(xml, encoding="utf-8")
    assert xml == golden.read_text(encoding="utf-8")


def test_qemu_gets_qemu64_cpu_and_kvm_host_model() -> None:
    tcg = ET.fromstring(build_domain_xml(tcg_direct_boot()))
    assert tcg.get("type") == "qemu"
    assert tcg.findtext("cpu/model") == "qemu64"
    assert tcg.findtext("os/kernel") == "/srv/dynvm/images/vmlinux-6.1"
    assert tcg.find("os/boot") is None
    kvm = ET.fromstring(build_domain_xml(service_bridge()))
    assert kvm.find("cpu").get("mode") == "host-model"  # type: ignore[union-attr]
    test = ET.fromstring(build_domain_xml(worker_test()))
    assert test.find("cpu") is None
    assert test.find("os/type").get("arch") == "x86_64"  # type: ignore[union-attr]


def test_fixed_features() -> None:
    dom = ET.fromstring(build_domain_xml(worker_test()))
    assert dom.find("features/acpi") is not None
    assert dom.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    assert dom.findtext("on_poweroff") == "destroy"
    assert dom.findtext("on_crash") == "destroy"


def test_share_rw_overrides_the_disk_frontend_by_its_libvirt_alias() -> None:
    """Test-only (ha.share_rw_data_disks): share-rw=on on the raw data disk, nothing on the others."""
    disks = (DiskSpec("/srv/ce.qcow2"),
             DiskSpec("/srv/ce.data.raw", format="raw", target="vdb", share_rw=True),
             DiskSpec("/srv/x.raw", format="raw", target="vdab", share_rw=True))
    dom = ET.fromstring(build_domain_xml(dataclasses.replace(service_bridge(), disks=disks)))
    q = f"{{{domxml.QEMU_NS}}}"
    devs = dom.findall(f"{q}override/{q}device")
    assert [d.get("alias") for d in devs] == ["virtio-disk1", "virtio-disk27"]
    for d in devs:
        (prop,) = d.findall(f"{q}frontend/{q}property")
        assert prop.attrib == {"name": "share-rw", "type": "bool", "value": "true"}
    assert ET.fromstring(build_domain_xml(service_bridge())).find(f"{q}override") is None


def test_x86_cpu_readback_drops_one_capability_for_this_domain() -> None:
    """guest_cpu_readback "x86": <qemu:capabilities><qemu:del capability='cpu-unavailable-features'/>, and
    nothing of the kind without it (tests/farm_qemu/test_cpu_readback.py proves the effect on libvirt)."""
    q = f"{{{domxml.QEMU_NS}}}"
    dom = ET.fromstring(build_domain_xml(dataclasses.replace(service_bridge(), x86_cpu_readback=True)))
    (cap,) = dom.findall(f"{q}capabilities/*")
    assert cap.tag == f"{q}del" and cap.attrib == {"capability": "cpu-unavailable-features"}
    assert ET.fromstring(build_domain_xml(service_bridge())).find(f"{q}capabilities") is None


def test_metadata_round_trip() -> None:
    assert parse_metadata(build_domain_xml(worker_test())) == META


def test_parse_metadata_foreign_domain() -> None:
    assert parse_metadata("<domain type='test'><name>x</name></domain>") == {}
    with pytest.raises(ValidationError):
        parse_metadata("<domain")


HOSTILE = [
    'cms"/><devices><disk type="file"><source file="/etc/shadow"/></disk></devices><x a="',
    "cms]]>",
    "a&b",
    "cms\nvo",
    "cms</dynvm:vo><dynvm:role>service</dynvm:role><dynvm:vo>",
    "c\u00e9ms",
    "cms\x00",
    "",
    "x" * 257,
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_metadata_is_refused(value: str) -> None:
    spec = dataclasses.replace(worker_test(), metadata={**META, "vo": value})
    with pytest.raises(ValidationError, match=r"metadata\.vo"):
        build_domain_xml(spec)


@pytest.mark.parametrize("value", [v for v in HOSTILE if "\x00" not in v])  # XML 1.0 cannot carry NUL
def test_hostile_text_cannot_inject_even_unvalidated(value: str) -> None:
    # Second line of defence: were validation ever loosened, ElementTree still escapes the text.
    dom = ET.Element("domain")
    domxml._metadata(dom, {"vo": value, "role": "worker"})
    text = ET.tostring(dom, encoding="unicode")
    back = parse_metadata(text)
    assert set(back) == {"vo", "role"}
    assert back["role"] == "worker"
    assert back["vo"].replace("\r", "\n") == value.replace("\r", "\n")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"name": "../x"}, "name"),
        ({"uuid": "not-a-uuid"}, "uuid"),
        ({"domain_type": "xen"}, "domain_type"),
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": True}, "vcpus"),
        ({"memory_mib": 1}, "memory_mib"),
        ({"kernel": "relative/vmlinux"}, "kernel"),
        ({"kernel": "/srv/../etc/passwd"}, "kernel"),
        ({"kernel": "/srv/vmlinux", "cmdline": "console=ttyS0' evil"}, "cmdline"),
        ({"cmdline": "quiet"}, "kernel"),
        ({"serial_log": "/var/log/x\n.log"}, "serial_log"),
        ({"disks": (DiskSpec("/a.qcow2"), DiskSpec("/b.qcow2"))}, r"disks\[1\]\.target"),
        ({"disks": (DiskSpec("/a.qcow2", format="vmdk"),)}, r"disks\[0\]\.format"),
        ({"disks": (DiskSpec("/a.qcow2", target="vda; rm"),)}, r"disks\[0\]\.target"),
        ({"disks": (DiskSpec("/a.qcow2", share_rw=True),)}, r"disks\[0\]\.share_rw"),
        ({"domain_type": "test", "x86_cpu_readback": True}, "x86_cpu_readback"),
        ({"disks": (DiskSpec("/a.raw", format="raw", target="sda", share_rw=True),)}, "share_rw"),
        ({"disks": (DiskSpec("/a.raw", format="raw", shareable=True, share_rw=True),)}, "share_rw"),
        ({"nics": (NicSpec("52:54:00:12:34:5G", bridge="br0"),)}, r"nics\[0\]\.mac"),
        ({"nics": (NicSpec("01:00:5e:00:00:01", bridge="br0"),)}, r"nics\[0\]\.mac"),
        ({"nics": (NicSpec("52:54:00:12:34:56"),)}, r"nics\[0\]"),
        ({"nics": (NicSpec("52:54:00:12:34:56", bridge="br0'/>"),)}, r"nics\[0\]\.bridge"),
        ({"channel": ChannelSpec("/run/" + "x" * 200)}, "channel.path"),
        ({"channel": ChannelSpec("/run/x.sock", name="a b")}, "channel.name"),
        ({"metadata": {"Bad-Key": "x"}}, "metadata key"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ],
)
def test_validation_names_the_field(change: dict[str, object], field: str) -> None:
    spec = dataclasses.replace(worker_test(), **change)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=field):
        build_domain_xml(spec)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["vo", "owner", "image", "instance_id"]), value=st.text(max_size=300))
def test_any_metadata_text_is_refused_or_round_trips(key: str, value: str) -> None:
    spec = dataclasses.replace(worker_test(), metadata={**META, key: value})
    try:
        xml = build_domain_xml(spec)
    except ValidationError:
        return
    assert parse_metadata(xml) == {**META, key: value}


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=80))
def test_any_name_is_refused_or_kept_verbatim(value: str) -> None:
    spec = dataclasses.replace(worker_test(), name=value)
    try:
        xml = build_domain_xml(spec)
    except ValidationError:
        return
    assert ET.fromstring(xml).findtext("name") == value
