"""The reconciler against real Redis and libvirt's real test driver, with writes landing between its reads.

``RacingHost`` (tests/agent/world.py) makes a write just before libvirt answers the domain listing, the
moment a migration or placement finishing elsewhere lands in the reported races.  Each test failed on
the reconciler before the decision table and the epoch compare-and-set.
"""

from __future__ import annotations

import time

import pytest

from provisioner.agent.reconcile import Action, Observation, apply, decide, reconcile_host
from provisioner.errors import ConflictError
from provisioner.model import InstanceState
from provisioner.runtime import Runtime
from tests.agent.world import (
    RacingHost,
    events,
    land,
    listed,
    migrate_in_redis,
    ready_on,
    running_here,
    start_domain,
)

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
S = InstanceState


def test_a_migration_landing_between_the_reads_keeps_the_vm(rt: Runtime) -> None:
    """hv2 -> hv1: the record still said migrating on hv2 when hv1's index was read; the migration landed
    before libvirt answered.  The old reconciler destroyed the healthy dynvm-mig1 as an orphan."""
    store = rt.store
    moving = migrate_in_redis(store, ready_on(store, "mig1", "hv2"), "hv1")
    name = start_domain(rt, "mig1")  # the guest has arrived on hv1
    assert isinstance(rt.hypervisor, RacingHost)

    def landing() -> None:
        land(store, moving, "hv1")

    rt.hypervisor.before_list = landing
    d = reconcile_host(rt)
    assert d.orphans == [] and d.replanned == ["mig1"]
    assert running_here(rt, name)
    rec = store.require_instance("mig1")
    assert (rec.state, rec.host) == (S.READY, "hv1")
    # the next pass reads it twice the same way: a healthy VM of this host
    again = reconcile_host(rt)
    assert (again.orphans, again.ghosts, again.replanned) == ([], [], [])
    assert running_here(rt, name) and "orphan_destroyed" not in events(store, "mig1")


def test_a_vm_that_migrated_away_between_the_reads_is_not_marked_lost(rt: Runtime) -> None:
    """hv1 -> hv2: hv1's index said READY on hv1, then the VM moved and landed before libvirt answered (no
    domain here any more).  The old reconciler marked it lost and so released its new claim on hv2."""
    store = rt.store
    read = ready_on(store, "mig1", "hv1")

    def migrate_away() -> None:
        land(store, migrate_in_redis(store, read, "hv2"), "hv2")

    assert isinstance(rt.hypervisor, RacingHost)
    rt.hypervisor.before_list = migrate_away
    d = reconcile_host(rt)
    assert d.ghosts == [] and d.replanned == ["mig1"]
    rec = store.require_instance("mig1")
    assert (rec.state, rec.host, rec.epoch) == (S.READY, "hv2", read.epoch + 1)
    assert "mig1" in store.claims_on("hv2") and "mig1" not in store.claims_on("hv1")
    assert "lost" not in events(store, "mig1")
    assert store.get_host("hv2").used_vcpus == 1  # type: ignore[union-attr]


def test_a_real_ghost_is_marked_lost_and_gives_its_claim_back(rt: Runtime) -> None:
    store = rt.store
    ready_on(store, "g1", "hv1")
    d = reconcile_host(rt)
    assert d.ghosts == ["g1"]
    rec = store.require_instance("g1")
    assert rec.state is S.LOST and "hv1" in rec.reason
    assert "g1" not in store.claims_on("hv1") and store.get_host("hv1").used_vcpus == 0  # type: ignore[union-attr]


def test_a_destroy_decided_on_a_stale_read_is_not_applied(rt: Runtime) -> None:
    """The record was failed with a leftover domain here (an orphan); before the destroy ran, it was
    recovered and placed on this host again (same domain name, new epoch).  The domain must survive."""
    store = rt.store
    read = ready_on(store, "s1", "hv1")
    failed = store.transition_from(read, S.FAILED, reason="test")
    name = start_domain(rt, "s1")
    decision = decide("hv1", Observation("s1", failed, failed, listed(rt, name)), time.time(), 300, False)
    assert decision.action is Action.DESTROY_ORPHAN
    again = store.transition_from(failed, S.REQUESTED, host="hv1")
    assert store.claim("hv1", "s1", 1, 256)
    store.transition_from(again, S.PLACED, bump_epoch=True)
    assert apply(rt, decision) is False
    assert running_here(rt, name)
    # decided on a current read, the same destroy goes ahead
    store.transition_from(store.require_instance("s1"), S.FAILED, reason="boot failed")
    current = store.require_instance("s1")
    fresh = decide("hv1", Observation("s1", current, current, listed(rt, name)), time.time(), 300, False)
    assert apply(rt, fresh) is True and not running_here(rt, name)


def test_no_destroy_while_this_agent_boots_the_instance(rt: Runtime) -> None:
    store = rt.store
    failed = store.transition_from(ready_on(store, "b1", "hv1"), S.FAILED, reason="test")
    name = start_domain(rt, "b1")
    decision = decide("hv1", Observation("b1", failed, failed, listed(rt, name)), time.time(), 300, False)
    rt.booting.add("b1")  # a boot of it holds the agent's slot
    assert apply(rt, decision) is False and running_here(rt, name)
    rt.booting.discard("b1")


def test_mark_lost_on_a_stale_read_changes_nothing(rt: Runtime) -> None:
    store = rt.store
    read = ready_on(store, "m1", "hv1")
    decision = decide("hv1", Observation("m1", read, read, None), time.time(), 300, False)
    assert decision.action is Action.MARK_LOST
    store.transition_from(read, S.DRAINING)  # moved on (a drain) after the decision
    before = store.require_instance("m1")
    assert apply(rt, decision) is False
    assert store.require_instance("m1") == before and "m1" in store.claims_on("hv1")


def test_a_stale_claim_is_released_by_compare_and_set_only(rt: Runtime) -> None:
    store = rt.store
    # a leaked claim on hv1 of a VM that runs on hv2 (updated long ago): given back
    read = ready_on(store, "c1", "hv2")
    store.update_instance_fields("c1", updated=time.time() - 3600)
    assert store.claim("hv1", "c1", 1, 256)
    assert reconcile_host(rt).claims_released == ["c1"]
    assert "c1" not in store.claims_on("hv1") and "c1" in store.claims_on("hv2")
    # the same decision on a read taken before the VM started moving to hv1 is refused
    read = store.require_instance("c1")
    moving = store.transition_from(read, S.MIGRATING)
    assert store.claim("hv1", "c1", 1, 256)
    with pytest.raises(ConflictError, match="is migrating, expected ready"):
        store.release_claim_from(read, "hv1")
    assert "c1" in store.claims_on("hv1")
    assert reconcile_host(rt).claims_released == []  # migrating: both claims stay
    land(store, moving, "hv1")
