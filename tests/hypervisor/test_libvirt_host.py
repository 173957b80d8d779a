"""LibvirtHost against the real libvirt test driver, in-process (no daemon, no QEMU)."""

from __future__ import annotations

import itertools
import pickle
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.errors import DeadlineExceeded, HypervisorError, HypervisorPermanentError
from provisioner.hypervisor.domxml import DiskSpec, DomainSpec, build_domain_xml
from provisioner.hypervisor.libvirt_conn import HypervisorTimeout
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.hypervisor.testdriver import write_test_host_xml
from provisioner.interfaces import DomainState, Hypervisor
from provisioner.model import Capacity

pytestmark = pytest.mark.libvirt
_seq = itertools.count()


def spec(name: str, **meta: str) -> DomainSpec:
    return DomainSpec(
        name=name,
        uuid=str(uuid.uuid4()),
        domain_type="test",
        vcpus=2,
        memory_mib=512,
        disks=(DiskSpec(f"/srv/dynvm/instances/{name}.qcow2"),),
        serial_log=f"/var/log/dynvm/{name}.log",
        metadata={
            "instance_id": name,
            "role": "worker",
            "vo": "cms",
            "owner": "slurm:1",
            "image": "cms-wn:1",
            **meta,
        },
    )


def fresh_name() -> str:
    return f"t{next(_seq)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def host_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_test_host_xml(tmp_path_factory.mktemp("lv") / "host1.xml", cpus=16, memory_mib=32768)


@pytest.fixture(scope="module")
def host(host_uri: str) -> Iterator[LibvirtHost]:
    h = LibvirtHost(host_uri, call_timeout_s=10.0)
    yield h
    h.close()


def test_is_a_hypervisor(host: LibvirtHost) -> None:
    assert isinstance(host, Hypervisor)


def test_capacity_from_node_file(host: LibvirtHost) -> None:
    assert host.capacity() == Capacity(vcpus=16, memory_mib=32768)


def test_host_identity(host: LibvirtHost, host_uri: str) -> None:
    assert host.hostname()
    first = host.host_uuid()
    assert uuid.UUID(first)
    assert host.host_uuid() == first == LibvirtHost(host_uri).host_uuid()


def test_lifecycle(host: LibvirtHost) -> None:
    name = fresh_name()
    s = spec(name)
    assert host.state(name) is DomainState.MISSING
    host.define_and_start(name, build_domain_xml(s))
    assert host.state(name) is DomainState.RUNNING
    listed = {d.name: d for d in host.list_domains()}
    assert listed[name].uuid == s.uuid
    assert listed[name].state is DomainState.RUNNING
    assert listed[name].metadata == dict(s.metadata)
    assert host.serial_log_path(name) == f"/var/log/dynvm/{name}.log"
    host.destroy(name)
    assert host.state(name) is DomainState.SHUTOFF
    host.undefine(name)
    assert host.state(name) is DomainState.MISSING
    assert name not in {d.name for d in host.list_domains()}


def test_define_and_start_is_idempotent(host: LibvirtHost) -> None:
    name = fresh_name()
    xml = build_domain_xml(spec(name))
    host.define_and_start(name, xml)
    host.define_and_start(name, xml)  # already running: nothing happens
    assert [d.name for d in host.list_domains()].count(name) == 1
    host.destroy(name)
    host.define_and_start(name, xml)  # defined but off: started again
    assert host.state(name) is DomainState.RUNNING
    host.destroy(name)
    host.undefine(name)


def test_shutdown_stops_a_running_domain(host: LibvirtHost) -> None:
    name = fresh_name()
    host.define_and_start(name, build_domain_xml(spec(name)))
    host.shutdown(name)
    assert host.state(name) is DomainState.SHUTOFF
    host.undefine(name)


def test_running_names_lists_only_running_domains(host: LibvirtHost) -> None:
    up, down = fresh_name(), fresh_name()
    host.define_and_start(up, build_domain_xml(spec(up)))
    host.define_and_start(down, build_domain_xml(spec(down)))
    host.destroy(down)
    names = host.running_names()
    assert up in names and down not in names
    host.destroy(up)
    assert up not in host.running_names()
    for n in (up, down):
        host.undefine(n)


def test_operations_on_missing_domain_are_no_ops(host: LibvirtHost) -> None:
    host.destroy("never-defined")
    host.shutdown("never-defined")
    host.undefine("never-defined")
    assert host.state("never-defined") is DomainState.MISSING
    assert host.serial_log_path("never-defined") is None


def test_bad_xml_is_permanent_and_names_host(host: LibvirtHost) -> None:
    with pytest.raises(HypervisorPermanentError) as info:
        host.define_and_start("broken", "<domain type='test'><name>broken</name><memory>x</memory></domain>")
    msg = str(info.value)
    assert host.uri in msg and "broken" in msg and "\n" not in msg
    assert host.state("broken") is DomainState.MISSING  # nothing half-created


def test_unparsable_xml_and_wrong_name(host: LibvirtHost) -> None:
    with pytest.raises(HypervisorPermanentError, match="does not parse"):
        host.define_and_start("x", "<domain")
    with pytest.raises(HypervisorPermanentError, match="does not define domain 'other'"):
        host.define_and_start("other", build_domain_xml(spec("mine")))


def test_same_name_other_uuid_is_permanent(host: LibvirtHost) -> None:
    name = fresh_name()
    host.define_and_start(name, build_domain_xml(spec(name)))
    host.destroy(name)
    with pytest.raises(HypervisorPermanentError) as info:
        host.define_and_start(name, build_domain_xml(spec(name)))  # new uuid, same name
    assert name in str(info.value) and "\n" not in str(info.value)
    host.undefine(name)


def test_unreachable_socket_fails_clearly() -> None:
    uri = "qemu+unix:///system?socket=/nonexistent"
    h = LibvirtHost(uri, call_timeout_s=5.0)
    with pytest.raises(HypervisorError) as info:
        h.capacity()
    assert not isinstance(info.value, HypervisorTimeout)
    msg = str(info.value)
    assert msg.startswith(f"cannot connect to libvirt at {uri}: ") and "\n" not in msg


def test_silent_daemon_times_out(tmp_path: Path) -> None:
    # A socket that accepts but never answers: libvirt would wait forever; the call timeout bounds it.
    path = tmp_path / "mute.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    uri = f"qemu+unix:///system?socket={path}"
    h = LibvirtHost(uri, call_timeout_s=0.5)
    try:
        with pytest.raises(HypervisorTimeout) as info:
            h.capacity()
    finally:
        srv.close()  # the abandoned libvirt thread then fails and ends
    assert isinstance(info.value, DeadlineExceeded) and isinstance(info.value, HypervisorError)
    assert uri in str(info.value)


def test_file_uri_state_lives_per_connection(host: LibvirtHost, host_uri: str) -> None:
    name = fresh_name()
    host.define_and_start(name, build_domain_xml(spec(name)))
    other = LibvirtHost(host_uri)
    try:
        assert other.state(name) is DomainState.MISSING  # its own fresh copy of the node
        assert host.state(name) is DomainState.RUNNING  # ours keeps its state across calls
    finally:
        other.close()
        host.destroy(name)
        host.undefine(name)


def test_reconnects_after_connection_dropped() -> None:
    h = LibvirtHost("test:///default")
    try:
        before = h.capacity()
        assert h._conn is not None
        h._conn.close()  # drop the real connection behind the host's back
        assert h.capacity() == before
        assert h.reconnects == 1
    finally:
        h.close()


def test_reconnects_once_when_connection_drops_mid_call() -> None:
    h = LibvirtHost("test:///default")
    calls: list[int] = []

    def op(conn):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            conn.close()  # the connection dies under a running operation
        return conn.getInfo()[2]

    try:
        assert h._call("get cpus", op) > 0
        assert len(calls) == 2 and h.reconnects == 1
    finally:
        h.close()


def test_test_driver_cannot_migrate(host: LibvirtHost, host_uri: str) -> None:
    with pytest.raises(HypervisorPermanentError, match="test driver cannot migrate"):
        host.migrate("x", LibvirtHost(host_uri))


def test_errors_pickle() -> None:
    err = HypervisorTimeout("test:///x: list domains: no answer within 1s")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is HypervisorTimeout and str(back) == str(err)
