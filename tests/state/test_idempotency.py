"""Idempotency keys map to live instances only, and a batch job's key includes its attempt."""

from __future__ import annotations

import pytest

from provisioner.errors import ValidationError
from provisioner.idempotency import job_key
from provisioner.model import Instance, InstanceState, Role
from provisioner.state import StateStore

pytestmark = pytest.mark.redis


def _inst(iid: str) -> Instance:
    return Instance(id=iid, role=Role.WORKER, image="cms-wn:1", vcpus=1, memory_mib=512, vo="cms")


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    return StateStore.from_url(redis_url)


def test_same_attempt_returns_the_same_live_vm(store: StateStore) -> None:
    key = job_key("alice", "1234", 0)
    first, created = store.create_instance(_inst("a1"), idempotency_key=key)
    again, created2 = store.create_instance(_inst("a2"), idempotency_key=key)
    assert (created, created2) == (True, False)
    assert again.id == first.id == "a1"
    assert store.get_instance("a2") is None


@pytest.mark.parametrize("end", [InstanceState.GONE, InstanceState.FAILED, InstanceState.LOST])
def test_an_ended_vm_never_satisfies_a_key(store: StateStore, end: InstanceState) -> None:
    key = job_key("alice", "77", 0)
    first, _ = store.create_instance(_inst("e1"), idempotency_key=key)
    if end is InstanceState.LOST:
        first = store.transition_from(first, InstanceState.PLACED, bump_epoch=True, host="hv1")
    store.transition_from(first, end, reason="test")
    fresh, created = store.create_instance(_inst("e2"), idempotency_key=key)
    assert created and fresh.id == "e2" and fresh.state is InstanceState.REQUESTED
    # The key now names the new, live instance: a repeat returns it.
    again, created2 = store.create_instance(_inst("e3"), idempotency_key=key)
    assert not created2 and again.id == "e2"
    assert store.instance_for_key(key) is not None and store.instance_for_key(key).id == "e2"  # type: ignore[union-attr]


def test_a_requeued_job_gets_a_fresh_vm(store: StateStore) -> None:
    """Same job id, next attempt: a new VM even while the previous attempt's VM still lives."""
    old, _ = store.create_instance(_inst("r1"), idempotency_key=job_key("alice", "55", 0))
    new, created = store.create_instance(_inst("r2"), idempotency_key=job_key("alice", "55", 1))
    assert created and new.id == "r2" and old.id == "r1"
    assert job_key("alice", "55", 0) != job_key("alice", "55", 1)


def test_job_key_format_and_validation() -> None:
    assert job_key("alice", "123_4", 2) == "job:alice:123_4:2"
    # '+' (a Slurm het component) is outside the key alphabet: hex-encoded, never equal to "123_1".
    assert job_key("alice", "123+1", 0) != job_key("alice", "123_1", 0)
    for bad in [
        ("al ice", "1", 0),
        ("alice", "1:2", 0),
        ("alice", "1", -1),
        ("alice", "1", True),
        ("", "1", 0),
        ("alice", "x" * 200, 0),
        ("alice", "1\n", 0),
    ]:
        with pytest.raises(ValidationError):
            job_key(*bad)  # type: ignore[arg-type]
