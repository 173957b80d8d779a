"""Small builders for scheduler tests: hosts, instances, snapshots, requests."""

from __future__ import annotations

from typing import Any

from provisioner.model import Capacity, Host, HostState, Instance, InstanceState, Role, Tier
from provisioner.scheduler import PlacementRequest, Snapshot


def host(name: str, vcpus: int = 8, mem: int = 16384, state: HostState = HostState.UP, **labels: str) -> Host:
    return Host(name, "test:///default", state, Capacity(vcpus, mem), labels=dict(labels))


def vm(
    iid: str,
    on: str,
    vcpus: int = 1,
    mem: int = 1024,
    tier: Tier = Tier.WORKER,
    vo: str | None = None,
    group: str | None = None,
    state: InstanceState = InstanceState.READY,
) -> Instance:
    role = Role.SERVICE if tier.rank >= 2 else Role.WORKER
    return Instance(iid, role, "img:1", vcpus, mem, state, tier, vo, on, anti_affinity=group)


def snap(hosts: list[Host], instances: list[Instance] = ()) -> Snapshot:  # type: ignore[assignment]
    """A snapshot whose host usage is the sum of its placed instances (as the claims would have it)."""
    by_name = {h.name: h for h in hosts}
    for inst in instances:
        if inst.host in by_name and inst.state not in (InstanceState.GONE, InstanceState.FAILED):
            by_name[inst.host].used_vcpus += inst.vcpus
            by_name[inst.host].used_memory_mib += inst.memory_mib
    return Snapshot(tuple(hosts), tuple(instances))


def req(iid: str, vcpus: int = 1, mem: int = 1024, tier: Tier = Tier.WORKER, **kw: Any) -> PlacementRequest:
    return PlacementRequest(iid, vcpus, mem, tier, **kw)
