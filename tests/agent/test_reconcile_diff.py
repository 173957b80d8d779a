"""The reconciler's pure decisions (diff, stale claims), table-driven."""

from __future__ import annotations

from provisioner.agent.reconcile import diff, stale_claims
from provisioner.interfaces import DomainInfo, DomainState
from provisioner.model import Instance, InstanceState, Role

NOW = 1_000_000.0


def inst(iid: str, state: InstanceState, host: str | None = "hv1", updated: float = NOW - 3600) -> Instance:
    return Instance(id=iid, role=Role.WORKER, image="cms-wn:1", vcpus=1, memory_mib=256, state=state,
                    host=host, updated=updated)


def dom(iid: str, state: DomainState = DomainState.RUNNING) -> DomainInfo:
    return DomainInfo(name=f"dynvm-{iid}", uuid="u", state=state, metadata={"instance_id": iid})


def test_orphans_ghosts_and_redrives() -> None:
    records = [inst("ready1", InstanceState.READY), inst("ghost1", InstanceState.READY),
               inst("gone1", InstanceState.GONE), inst("boot1", InstanceState.BOOTING, updated=NOW - 1)]
    domains = [dom("ready1"), dom("gone1"), dom("unknown1"), dom("boot1"),
               DomainInfo(name="foreign", uuid="f", state=DomainState.RUNNING, metadata={})]
    d = diff("hv1", domains, records, NOW, boot_grace_s=300, startup=False)
    assert sorted(d.orphans) == ["dynvm-gone1", "dynvm-unknown1"]  # foreign domains are never touched
    assert d.ghosts == ["ghost1"]
    assert d.redrive == []
    assert diff("hv1", domains, records, NOW, 300, startup=True).redrive == ["boot1"]


def test_a_migrating_vm_is_kept_on_its_destination_only_while_migrating() -> None:
    moving = inst("mig1", InstanceState.MIGRATING, host="hv2")
    d = diff("hv1", [dom("mig1")], [], NOW, 300, False, elsewhere={"mig1": moving})
    assert d.orphans == []
    settled = inst("mig1", InstanceState.READY, host="hv2")
    d = diff("hv1", [dom("mig1")], [], NOW, 300, False, elsewhere={"mig1": settled})
    assert d.orphans == ["dynvm-mig1"]  # the record says it runs on hv2: a copy here must go


def test_stale_claims() -> None:
    records = {
        "ok": inst("ok", InstanceState.READY),
        "gone": inst("gone", InstanceState.GONE),
        "elsewhere": inst("elsewhere", InstanceState.READY, host="hv2"),
        "fresh": inst("fresh", InstanceState.REQUESTED, host=None, updated=NOW - 1),
        "stuck": inst("stuck", InstanceState.REQUESTED, host=None),
        "migdest": inst("migdest", InstanceState.MIGRATING, host="hv2"),
        "missing": None,
    }
    got = stale_claims("hv1", list(records), records, NOW)
    assert sorted(got) == ["elsewhere", "gone", "missing", "stuck"]
