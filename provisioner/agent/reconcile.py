"""Reconciliation on one host: libvirt is the truth for what runs, Redis for what should run.

Decide (pure ``diff``) then do (``reconcile_host``).  Orphans (dynvm domains Redis does not want) are
destroyed; ghosts (records that claim a running VM libvirt does not have) are marked lost; instances left
placed/booting by a dead agent are re-driven.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from provisioner.errors import ConflictError, DynvmError
from provisioner.interfaces import DomainInfo, DomainState
from provisioner.model import CLAIMING_STATES, Instance, InstanceState
from provisioner.runtime import Runtime

log = logging.getLogger(__name__)
WANTED_RUNNING = frozenset({InstanceState.READY, InstanceState.DRAINING})
KEEP_DOMAIN = CLAIMING_STATES  # a domain is wanted wherever its record holds capacity


@dataclass
class Diff:
    orphans: list[str] = field(default_factory=list)  # domain names to destroy
    ghosts: list[str] = field(default_factory=list)  # instance ids whose VM is gone
    redrive: list[str] = field(default_factory=list)  # instance ids to boot again


def diff(
    host: str,
    domains: list[DomainInfo],
    instances: list[Instance],
    now: float,
    boot_grace_s: float,
    startup: bool,
    elsewhere: dict[str, Instance] | None = None,
) -> Diff:
    """``instances``: the records placed on ``host``; ``elsewhere``: records of domains found here whose
    record names another host (a live migration in flight is kept; anything else must not run here)."""
    by_id = {i.id: i for i in instances if i.host == host}
    running = {d.metadata.get("instance_id"): d for d in domains if d.metadata.get("instance_id")}
    out = Diff()
    for iid, dom in running.items():
        inst = by_id.get(iid or "")
        if inst is None:
            other = (elsewhere or {}).get(iid or "")
            if other is None or other.state is not InstanceState.MIGRATING:
                out.orphans.append(dom.name)
        elif inst.state not in KEEP_DOMAIN:
            out.orphans.append(dom.name)
    for inst in by_id.values():
        found = running.get(inst.id)
        alive = found is not None and found.state in (DomainState.RUNNING, DomainState.PAUSED)
        if inst.state in WANTED_RUNNING and not alive:
            out.ghosts.append(inst.id)
        elif inst.state in (InstanceState.PLACED, InstanceState.BOOTING) and (
            startup or now - inst.updated > boot_grace_s
        ):
            out.redrive.append(inst.id)
    return out


STALE_CLAIM_S = 60.0  # a placement holds a claim a few ms before its record says so: leave those alone


def stale_claims(
    host: str,
    claimed: list[str],
    records: dict[str, Instance | None],
    now: float,
    grace_s: float = STALE_CLAIM_S,
) -> list[str]:
    """Claims on ``host`` that no record justifies: the instance is gone, elsewhere, or not in a claiming
    state (a control worker died between claiming and recording the placement).  A migration's claim on
    its destination is kept while the record says ``migrating``."""
    out = []
    for iid in claimed:
        rec = records.get(iid)
        if rec is not None:
            if rec.state is InstanceState.MIGRATING:
                continue
            if rec.host == host and rec.state in CLAIMING_STATES:
                continue
            if now - rec.updated < grace_s:
                continue
        out.append(iid)
    return out


def reconcile_host(rt: Runtime, startup: bool = False) -> Diff:
    assert rt.hypervisor is not None and rt.host is not None
    instances = rt.store.list_instances(host=rt.host)
    domains = rt.hypervisor.list_domains()
    mine = {i.id for i in instances}
    elsewhere: dict[str, Instance] = {}
    for dom in domains:
        iid = dom.metadata.get("instance_id")
        if iid and iid not in mine:
            rec = rt.store.get_instance(iid)
            if rec is not None:
                elsewhere[iid] = rec
    grace = rt.config.timeouts.provision_s
    d = diff(rt.host, domains, instances, time.time(), grace, startup, elsewhere)
    for name in d.orphans:
        log.warning("reconcile %s: destroying orphan domain %s", rt.host, name)
        rt.hypervisor.destroy(name)
        rt.hypervisor.undefine(name)
        rt.store.add_event("orphan_destroyed", host=rt.host, message=f"domain {name} had no live record")
    for iid in d.ghosts:
        try:
            rt.store.transition(iid, InstanceState.LOST, reason=f"VM not running on {rt.host}")
        except ConflictError:
            continue
        rt.store.release_claim(rt.host, iid)
        rt.store.add_event(
            "lost", instance=iid, host=rt.host, message="record said running; libvirt disagrees"
        )
        rt.store.notify(iid)
    claimed = list(rt.store.claims_on(rt.host))
    records = {iid: rt.store.get_instance(iid) for iid in claimed}
    for iid in stale_claims(rt.host, claimed, records, time.time()):
        rt.store.release_claim(rt.host, iid)
        rt.store.add_event("claim_released", instance=iid, host=rt.host, message="no record justifies it")
    if d.redrive:
        from provisioner.agent.lifecycle import boot_instance

        for iid in d.redrive:
            rt.store.add_event("redrive", instance=iid, host=rt.host, message="re-driving an unfinished boot")
            try:
                boot_instance(rt, iid)
            except DynvmError as err:
                log.warning("reconcile %s: re-driving %s failed: %s", rt.host, iid, err)
    return d
