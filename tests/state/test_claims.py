"""Capacity claims against a real Redis: atomic, idempotent, never overbooking under races."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import cast

import pytest

from provisioner.errors import ConflictError, ValidationError
from provisioner.model import Capacity, Host, HostState, Instance, InstanceState, Role
from provisioner.state import ClaimRequest, StateStore

pytestmark = pytest.mark.redis


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    s = StateStore.from_url(redis_url)
    for name, vcpus in (("hv01", 32), ("hv02", 24), ("hv03", 16)):
        s.register_host(Host(name, "test:///default", capacity=Capacity(vcpus, vcpus * 2048)))
        s.r.set(s.keys.lease(name), "agent-token", px=600_000)  # as if each host's agent were alive
    return s


def race(n: int, fn: Callable[[int], object]) -> list[object]:
    """Run fn(0..n-1) in n threads released together; re-raise the first worker exception."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as err:  # collected and re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    if errors:
        raise errors[0]
    return results


def check_books(store: StateStore, cpu_oc: float = 1.0, mem_oc: float = 1.0) -> int:
    total = 0
    for h in store.list_hosts():
        claims = store.claims_on(h.name)
        sum_v = sum(v for v, _ in claims.values())
        sum_m = sum(m for _, m in claims.values())
        assert (h.used_vcpus, h.used_memory_mib) == (sum_v, sum_m), h.name
        assert sum_v <= int(h.capacity.vcpus * cpu_oc), h.name
        assert sum_m <= int(h.capacity.memory_mib * mem_oc), h.name
        total += len(claims)
    return total


@pytest.mark.parametrize("overcommit", [1.0, 1.5])
def test_racing_claims_never_overbook(store: StateStore, overcommit: float) -> None:
    hosts = ["hv01", "hv02", "hv03"]

    def worker(t: int) -> int:
        rnd = random.Random(t)
        won = 0
        for k in range(50):
            iid = f"t{t}-{k}"
            v = rnd.randint(1, 4)
            where = rnd.choice(hosts)
            if store.claim(where, iid, v, v * 1024, overcommit, overcommit):
                won += 1
                if rnd.random() < 0.2:  # some give their claim back, freeing room for others
                    assert store.release_claim(where, iid)
                    won -= 1
        return won

    wins = race(16, worker)
    assert check_books(store, overcommit, overcommit) == sum(int(str(w)) for w in wins)
    # Demand (16 x 50 x ~2.5 vCPU) far exceeds 72 vCPU: the race really was at the limit.
    assert sum(h.used_vcpus for h in store.list_hosts()) >= int(72 * overcommit) - 3


def test_claim_is_idempotent_and_release_too(store: StateStore) -> None:
    assert store.claim("hv03", "a", 8, 1024)
    assert store.claim("hv03", "a", 8, 1024)  # a redelivered task
    assert store.get_host("hv03").used_vcpus == 8  # type: ignore[union-attr]
    assert store.claim("hv03", "a", 10, 1024)  # resize counts only the difference
    assert store.get_host("hv03").used_vcpus == 10  # type: ignore[union-attr]
    assert store.release_claim("hv03", "a") and not store.release_claim("hv03", "a")
    assert store.get_host("hv03").used_vcpus == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("state", [s for s in HostState if s is not HostState.UP])
def test_no_claims_on_hosts_that_are_not_up(store: StateStore, state: HostState) -> None:
    if state is HostState.FENCED:  # fenced only after dead (provisioner.model.HOST_TRANSITIONS)
        store.set_host_state("hv01", HostState.DEAD, expected=HostState.UP)
    was = HostState.DEAD if state is HostState.FENCED else HostState.UP
    store.set_host_state("hv01", state, expected=was)
    assert not store.claim("hv01", "a", 1, 1)
    assert store.claim_batch([ClaimRequest("hv01", "a", 1, 1)]).codes == {"a": f"state:{state.value}"}


def test_claim_limits(store: StateStore) -> None:
    assert not store.claim("ghost", "a", 1, 1)
    assert not store.claim("hv03", "a", 17, 1)
    assert not store.claim("hv03", "a", 1, 16 * 2048 + 1)
    assert store.claim("hv03", "a", 16, 16 * 2048)
    with pytest.raises(ValidationError):
        store.claim("hv03", "b", -1, 1)
    with pytest.raises(ValidationError):
        store.claim("hv03", "b", 1, 1, cpu_overcommit=0)


def test_claim_batch_is_all_or_nothing(store: StateStore) -> None:
    store.claim("hv03", "pool1", 10, 1024)
    batch = [ClaimRequest("hv01", "ce", 20, 1024), ClaimRequest("hv03", "se", 8, 1024)]
    result = store.claim_batch(batch)
    assert not result.committed and result.failed == {"se": "capacity"}
    assert store.claims_on("hv01") == {}  # ce was not taken either
    # With the pool VM preempted in the same step, the whole plan fits.
    result = store.claim_batch(batch, releases=[("hv03", "pool1")])
    assert result.committed and result.codes == {"ce": "ok", "se": "ok"}
    assert store.claims_on("hv03") == {"se": (8, 1024)}
    check_books(store)


def test_claims_in_one_batch_see_each_other(store: StateStore) -> None:
    result = store.claim_batch([ClaimRequest("hv03", "a", 10, 1), ClaimRequest("hv03", "b", 10, 1)])
    assert not result.committed and result.codes == {"a": "ok", "b": "capacity"}


def test_racing_creates_with_one_key_make_one_instance(redis_url: str) -> None:
    store = StateStore(redis_url)

    def create(i: int) -> tuple[str, bool]:
        inst, created = store.create_instance(
            Instance(f"vm-{i}", Role.WORKER, "img:1", 1, 512), idempotency_key="slurm:42"
        )
        return inst.id, created

    results = [cast(tuple[str, bool], r) for r in race(16, create)]
    ids = {r[0] for r in results}
    assert len(ids) == 1
    assert sum(1 for r in results if r[1]) == 1
    assert [i.id for i in store.list_instances()] == list(ids)


def test_racing_transitions_exactly_one_wins(redis_url: str) -> None:
    store = StateStore(redis_url)
    store.create_instance(Instance("a", Role.SERVICE, "img:1", 1, 512, state=InstanceState.READY))
    targets = [InstanceState.STOPPING, InstanceState.MIGRATING, InstanceState.DRAINING, InstanceState.FAILED]

    def move(i: int) -> str:
        try:
            store.transition("a", targets[i % 4], expected=InstanceState.READY, reason=f"t{i}")
            return "won"
        except ConflictError:
            return "lost"

    results = race(16, move)
    assert results.count("won") == 1
    final = store.get_instance("a")
    assert final is not None
    winner = next(i for i, r in enumerate(results) if r == "won")
    assert (final.state, final.reason) == (targets[winner % 4], f"t{winner}")
    assert [i.id for i in store.list_instances(state=final.state)] == ["a"]
    assert store.list_instances(state=InstanceState.READY) == []
