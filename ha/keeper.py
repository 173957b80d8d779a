"""Declared services are never silently absent: the leader compares what is declared with the instance
records each round and starts what is missing — in place first (the host it last ran on, while that host
is up and the service is under its image's restart limit), elsewhere after that.

A hung service is handled the same way (``decide_hung``): its host's agent marks its VM ``unhealthy`` by
the image's health probe (ha/health.py); the keeper marks it ``restart`` (counted against the limit) or,
past the limit, ``relocate``; the agent destroys it and records it lost; ``decide`` then re-places that same
record (its id, MAC, address and disks) on the same host or, for a relocation, on another one.

Pure decisions (``decide``, ``decide_hung``) over the declarations, the live and ended records, their
health marks and the restart history; the engine's World does the starting.  A service whose host is dead
is the failover engine's business, not the keeper's: the keeper waits until that host's recovery is closed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ha.health import Health, Mark
from ha.services import Service
from provisioner.model import HostState, Instance, InstanceState

ENDED = frozenset({InstanceState.GONE, InstanceState.FAILED, InstanceState.LOST})


@dataclass(frozen=True, slots=True)
class Start:
    service: str
    host: str | None  # pinned (restart in place) or None (relocate: the scheduler chooses)
    why: str
    instance: str | None = None  # re-place this lost record (a hung VM the agent stopped) instead of a new VM
    avoid: str | None = None  # a relocation: not back on this host unless nowhere else fits


@dataclass(frozen=True, slots=True)
class Hung:
    """Ask the agent of ``host`` to stop the hung VM (``instance`` at ``epoch``) for ``mark``."""

    service: str
    instance: str
    host: str
    epoch: int
    mark: Mark  # RESTART (counted against the restart limit) or RELOCATE
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
    health: Mapping[str, Health] | None = None,
) -> tuple[list[Start], list[str]]:
    """Which declared services to start (and where), and problems to report (duplicates).

    ``health``: the health marks by instance id; a lost record marked ``restart``/``relocate`` at its
    epoch is a hung VM its agent stopped for the keeper: that record is re-placed, not a new VM made."""
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
        used, lim = _restart_budget(svc.name, restarts, limits, now)
        mark = _mark(last, health)
        if last is not None and last.state is InstanceState.LOST and mark in (Mark.RESTART, Mark.RELOCATE):
            if mark is Mark.RESTART and last.host and hosts.get(last.host) is HostState.UP:
                starts.append(Start(svc.name, last.host, f"hung on {last.host}: restarting in place",
                                    instance=last.id))
            else:
                where = last.host or "-"
                starts.append(Start(svc.name, None, f"hung on {where}: relocating", instance=last.id,
                                    avoid=last.host))
            continue
        if last is None:
            starts.append(Start(svc.name, None, "declared, no VM yet"))
        elif last.host and hosts.get(last.host) is HostState.UP and used < lim.max_restarts:
            starts.append(
                Start(svc.name, last.host, f"{last.state.value} on {last.host}: restart in place "
                      f"({used + 1}/{lim.max_restarts})")
            )
        else:
            where = f"on {last.host}" if last.host else "unplaced"
            starts.append(Start(svc.name, None, f"{last.state.value} {where}: relocating"))
    return starts, problems


def _restart_budget(name: str, restarts: Mapping[str, Sequence[float]], limits: Mapping[str, Limits],
                    now: float) -> tuple[int, Limits]:
    """How many in-place restarts service ``name`` had within its window, and its limits."""
    lim = limits.get(name, Limits())
    return sum(1 for t in restarts.get(name, ()) if now - t <= lim.window_s), lim


def _mark(inst: Instance | None, health: Mapping[str, Health] | None) -> Mark:
    h = (health or {}).get(inst.id) if inst is not None else None
    return h.current(inst.epoch) if h is not None and inst is not None else Mark.HEALTHY


def decide_hung(
    declared: Sequence[Service],
    instances: Sequence[Instance],
    hosts: Mapping[str, HostState],
    restarts: Mapping[str, Sequence[float]],
    limits: Mapping[str, Limits],
    now: float,
    health: Mapping[str, Health],
) -> list[Hung]:
    """Which hung service VMs (ready, marked ``unhealthy`` by their agent at their current epoch) to stop:
    for a restart in place while the host is up and the service is under its restart limit, else for a
    relocation.  A host draining sends its hung services elsewhere; on a host in maintenance (HA
    disarmed), suspect, dead or fenced nothing is decided here (the failover engine owns dead hosts)."""
    out: list[Hung] = []
    by_service: dict[str, list[Instance]] = {}
    for inst in instances:
        if inst.service and inst.state not in ENDED:
            by_service.setdefault(inst.service, []).append(inst)
    for svc in declared:
        live = by_service.get(svc.name, [])
        if len(live) != 1:
            continue  # none (decide starts one) or duplicates (reported by decide)
        inst = live[0]
        h = health.get(inst.id)
        if inst.state is not InstanceState.READY or inst.host is None:
            continue
        if _mark(inst, health) is not Mark.UNHEALTHY:
            continue
        hs = hosts.get(inst.host)
        used, lim = _restart_budget(svc.name, restarts, limits, now)
        seen = f"unhealthy on {inst.host}" + (f" ({h.failures} failed probes: {h.detail})" if h else "")
        if hs is HostState.UP and used < lim.max_restarts:
            out.append(Hung(svc.name, inst.id, inst.host, inst.epoch, Mark.RESTART,
                            f"{seen}: restart in place ({used + 1}/{lim.max_restarts})"))
        elif hs in (HostState.UP, HostState.DRAINING):
            why = (f"{used} restarts in place within {lim.window_s:g} s (limit {lim.max_restarts})"
                   if hs is HostState.UP else f"{inst.host} is draining")
            out.append(
                Hung(svc.name, inst.id, inst.host, inst.epoch, Mark.RELOCATE, f"{seen}: relocating, {why}")
            )
    return out
