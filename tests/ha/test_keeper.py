"""The declared-services keeper's decisions, row by row."""

from __future__ import annotations

from ha.keeper import Limits, Start, decide
from ha.services import Service
from provisioner.model import HostState, Instance, InstanceState, Role, Tier

UP = {"hv1": HostState.UP, "hv2": HostState.UP, "hv3": HostState.DEAD}
CE = Service("ce-01", "ce", Tier.CRITICAL)


def rec(iid: str, state: InstanceState, host: str | None, updated: float = 1.0) -> Instance:
    return Instance(iid, Role.SERVICE, "ce:1", 1, 256, state, Tier.CRITICAL, host=host, service="ce-01",
                    updated=updated)


def test_declared_without_a_vm_is_started_anywhere() -> None:
    assert decide([CE], [], UP, {}, {}, now=100.0) == ([Start("ce-01", None, "declared, no VM yet")], [])


def test_a_live_vm_is_left_alone() -> None:
    for state in (InstanceState.REQUESTED, InstanceState.PLACED, InstanceState.BOOTING, InstanceState.READY):
        assert decide([CE], [rec("a", state, "hv1")], UP, {}, {}, now=100.0) == ([], [])


def test_failed_on_an_up_host_restarts_in_place_then_relocates_after_the_limit() -> None:
    inst = [rec("a", InstanceState.FAILED, "hv1")]
    starts, _ = decide([CE], inst, UP, {"ce-01": [90.0]}, {"ce-01": Limits(2, 60)}, now=100.0)
    assert starts == [Start("ce-01", "hv1", "failed on hv1: restart in place (2/2)")]
    starts, _ = decide([CE], inst, UP, {"ce-01": [90.0, 95.0]}, {"ce-01": Limits(2, 60)}, now=100.0)
    assert starts[0].host is None and "relocating" in starts[0].why
    # restarts outside the window no longer count
    starts, _ = decide([CE], inst, UP, {"ce-01": [10.0, 20.0]}, {"ce-01": Limits(2, 60)}, now=100.0)
    assert starts[0].host == "hv1"


def test_lost_on_a_dead_host_waits_for_its_recovery_then_relocates() -> None:
    inst = [rec("a", InstanceState.LOST, "hv3")]
    assert decide([CE], inst, UP, {}, {}, now=100.0, recovering=frozenset({"hv3"})) == ([], [])
    starts, _ = decide([CE], inst, UP, {}, {}, now=100.0)
    assert starts == [Start("ce-01", None, "lost on hv3: relocating")]


def test_the_latest_record_decides_and_duplicates_are_reported() -> None:
    inst = [rec("old", InstanceState.GONE, "hv2", 1.0), rec("new", InstanceState.FAILED, "hv1", 2.0)]
    assert decide([CE], inst, UP, {}, {}, now=100.0)[0][0].host == "hv1"
    dup = [rec("a", InstanceState.READY, "hv1"), rec("b", InstanceState.READY, "hv2")]
    starts, problems = decide([CE], dup, UP, {}, {}, now=100.0)
    assert starts == [] and problems == ["service ce-01 has 2 live VMs: a, b"]
