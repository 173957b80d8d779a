"""Declared services are never silently absent: the leader compares what is declared with the instance
records each round and starts what is missing — in place first (the host it last ran on, while that host
is up and the service is under its image's restart limit), elsewhere after that.

Pure decision (``decide``) over the declarations, the live and ended records and the restart history; the
engine's World does the starting.  A service whose host is dead is the failover engine's business, not
the keeper's: the keeper waits until that host's recovery is closed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ha.services import Service
from provisioner.model import HostState, Instance, InstanceState

ENDED = frozenset({InstanceState.GONE, InstanceState.FAILED, InstanceState.LOST})


@dataclass(frozen=True, slots=True)
class Start:
    service: str
    host: str | None  # pinned (restart in place) or None (relocate: the scheduler chooses)
    why: str


@dataclass(frozen=True, slots=True)
class Limits:
    max_restarts: int = 3
    window_s: float = 3600.0


# What the keeper reads each round: declarations, each one's current instance record, restart times, limits.
Declared = tuple[list[Service], dict[str, Instance | None], dict[str, list[float]], dict[str, "Limits"]]


def decide(
    declared: Sequence[Service],
    instances: Sequence[Instance],
    hosts: Mapping[str, HostState],
    restarts: Mapping[str, Sequence[float]],
    limits: Mapping[str, Limits],
    now: float,
    recovering: frozenset[str] = frozenset(),
) -> tuple[list[Start], list[str]]:
    """Which declared services to start (and where), and problems to report (duplicates)."""
    starts: list[Start] = []
    problems: list[str] = []
    by_service: dict[str, list[Instance]] = {}
    for inst in instances:
        if inst.service:
            by_service.setdefault(inst.service, []).append(inst)
    for svc in declared:
        recs = sorted(by_service.get(svc.name, []), key=lambda i: (i.updated, i.id))
        live = [i for i in recs if i.state not in ENDED]
        if len(live) > 1:
            problems.append(f"service {svc.name} has {len(live)} live VMs: {', '.join(i.id for i in live)}")
        if live:
            continue
        last = recs[-1] if recs else None
        if last is not None and last.host is not None and last.host in recovering:
            continue  # its host's failover will bring it back
        lim = limits.get(svc.name, Limits())
        recent = [t for t in restarts.get(svc.name, ()) if now - t <= lim.window_s]
        if last is None:
            starts.append(Start(svc.name, None, "declared, no VM yet"))
        elif last.host and hosts.get(last.host) is HostState.UP and len(recent) < lim.max_restarts:
            starts.append(
                Start(svc.name, last.host, f"{last.state.value} on {last.host}: restart in place "
                      f"({len(recent) + 1}/{lim.max_restarts})")
            )
        else:
            where = f"on {last.host}" if last.host else "unplaced"
            starts.append(Start(svc.name, None, f"{last.state.value} {where}: relocating"))
    return starts, problems
