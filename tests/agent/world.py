"""A host agent's runtime on real Redis and libvirt's real test driver, for the agent's tests.

``RacingHost`` is the real test-driver host; a test gives it a write to make just before libvirt answers
the domain listing (the moment a migration or placement finishing elsewhere lands in the reported races).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from provisioner.hypervisor.domxml import DomainSpec, build_domain_xml
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.interfaces import DomainInfo, DomainState
from provisioner.model import Instance, InstanceState, Role
from provisioner.runtime import Runtime
from provisioner.state import StateStore

S = InstanceState


class RacingHost(LibvirtHost):
    """The real test-driver host, with an optional write to make right before it lists its domains."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.before_list: Callable[[], None] | None = None

    def list_domains(self) -> list[DomainInfo]:
        hook, self.before_list = self.before_list, None
        if hook is not None:
            hook()
        return super().list_domains()


def start_domain(rt: Runtime, iid: str) -> str:
    assert rt.hypervisor is not None
    name = f"dynvm-{iid}"
    spec = DomainSpec(
        name=name,
        uuid=str(uuid.uuid4()),
        domain_type="test",
        vcpus=1,
        memory_mib=256,
        console_pty=False,
        metadata={"instance_id": iid, "role": "worker", "image": "cms-wn:1"},
    )
    rt.hypervisor.define_and_start(name, build_domain_xml(spec))
    return name


def running_here(rt: Runtime, name: str) -> bool:
    assert rt.hypervisor is not None
    return rt.hypervisor.state(name) is DomainState.RUNNING


def ready_on(store: StateStore, iid: str, host: str) -> Instance:
    """A record placed, booted and ready on ``host``, holding its claim there (by the real transitions)."""
    store.create_instance(Instance(iid, Role.WORKER, "cms-wn:1", 1, 256, created=time.time()))
    assert store.claim(host, iid, 1, 256)
    read = store.require_instance(iid)
    read = store.transition_from(read, S.PLACED, bump_epoch=True, host=host)
    read = store.transition_from(read, S.BOOTING)
    return store.transition_from(read, S.READY)


def migrate_in_redis(store: StateStore, read: Instance, dest: str) -> Instance:
    """What agent/migrate.py writes around the libvirt move (the move itself is the test's business)."""
    moving = store.transition_from(read, S.MIGRATING)
    assert store.claim(dest, read.id, 1, 256)
    return moving


def land(store: StateStore, moving: Instance, dest: str) -> Instance:
    return store.transition_from(moving, S.READY, host=dest, release_on=moving.host)


def events(store: StateStore, iid: str) -> list[str]:
    return [e.kind for e in store.read_events(count=500) if e.instance == iid]


def listed(rt: Runtime, name: str) -> DomainInfo:
    assert rt.hypervisor is not None
    return next(d for d in rt.hypervisor.list_domains() if d.name == name)
