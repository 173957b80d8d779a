"""The agent's own writes (boot, fail, release, migrate) act only on the record they read: real Redis, real
libvirt test driver."""

from __future__ import annotations

import pytest

from provisioner.agent.lifecycle import _fail, boot_instance, release_instance
from provisioner.agent.migrate import migrate_instance
from provisioner.model import Instance, InstanceState, Role
from provisioner.runtime import Runtime
from tests.agent.world import events, land, migrate_in_redis, ready_on, running_here, start_domain

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
S = InstanceState


def test_a_late_migrate_request_does_not_move_a_vm_that_moved_since(rt: Runtime) -> None:
    """The request was made at epoch E; the VM went to hv2 and came back (epoch E+2).  Replayed now, the
    old request would send it away again; it is refused and nothing is claimed."""
    store = rt.store
    asked = ready_on(store, "v1", "hv1")
    there = land(store, migrate_in_redis(store, asked, "hv2"), "hv2")
    back = land(store, migrate_in_redis(store, there, "hv1"), "hv1")
    assert back.epoch == asked.epoch + 2
    migrate_instance(rt, "v1", "hv2", expected_epoch=asked.epoch)
    assert store.require_instance("v1") == back
    assert "v1" not in store.claims_on("hv2")
    assert "migration_refused" in events(store, "v1")


def test_a_failed_boot_does_not_fail_or_tear_down_a_record_released_meanwhile(rt: Runtime) -> None:
    store = rt.store
    read = ready_on(store, "f1", "hv1")
    stopping = store.transition_from(read, S.STOPPING)  # released while "booting"
    name = start_domain(rt, "f1")
    _fail(rt, read, "boot failed on the old read")
    now = store.require_instance("f1")
    assert now == stopping  # not failed: the release owns it now
    assert running_here(rt, name)  # and it tears the domain down, not us
    release_instance(rt, "f1")
    assert store.require_instance("f1").state is S.GONE and not running_here(rt, name)
    assert "f1" not in store.claims_on("hv1")


def test_a_redriven_boot_of_an_older_placement_does_nothing(rt: Runtime) -> None:
    store = rt.store
    store.create_instance(Instance("p1", Role.WORKER, "cms-wn:1", 1, 256))
    assert store.claim("hv1", "p1", 1, 256)
    placed = store.transition_from(store.require_instance("p1"), S.PLACED, bump_epoch=True, host="hv1")
    boot_instance(rt, "p1", expected_epoch=placed.epoch - 1)
    assert store.require_instance("p1") == placed


def test_release_of_a_vm_that_moved_is_left_to_its_new_host(rt: Runtime) -> None:
    store = rt.store
    read = ready_on(store, "r1", "hv2")
    release_instance(rt, "r1")  # this agent is hv1
    assert store.require_instance("r1") == read
