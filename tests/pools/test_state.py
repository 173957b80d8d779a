"""Pool and breaker state against a real Redis: settings by compare-and-set, the atomic hand-over of warm
VMs to racing prologs (real processes), retire vs take, and boot outcomes counted once per attempt."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from batch_hooks.pools import PoolSettings
from batch_hooks.poolstate import PoolState
from provisioner.breaker import BreakerSettings, BreakerStore, BState, CircuitOpenError, Ev
from provisioner.errors import ConflictError
from provisioner.model import Instance, InstanceState, Role, Tier
from provisioner.state import StateStore

pytestmark = pytest.mark.redis
IMAGE = "cms-wn:2026.11.2"


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    return StateStore.from_url(redis_url)


def pool_vm(store: StateStore, ps: PoolState, iid: str, vo: str = "cms",
            state: InstanceState = InstanceState.READY, vcpus: int = 2, image: str = IMAGE) -> None:
    inst = Instance(iid, Role.WORKER, image, vcpus, 2048, state=state, tier=Tier.POOL, vo=vo, host="hv01")
    store.create_instance(inst)
    ps.add_member(vo, iid)


def test_settings_compare_and_set(store: StateStore) -> None:
    ps = PoolState(store.r, "dynvm", PoolSettings(0, 2, 60))
    assert ps.settings("cms") == (PoolSettings(0, 2, 60), 0)  # never set: the configured defaults
    assert ps.set_settings("cms", PoolSettings(1, 5, 30), expected_rev=0) == 1
    assert ps.settings("cms") == (PoolSettings(1, 5, 30), 1)
    with pytest.raises(ConflictError, match="revision 1, read 0"):
        ps.set_settings("cms", PoolSettings(0, 9, 30), expected_rev=0)  # a stale read is refused
    assert ps.settings("cms")[0].max == 5
    assert ps.vos() == ["cms"]


def _take_many(url: str, jobs: list[int], barrier: object, out: object) -> None:
    store = StateStore.from_url(url)
    ps = PoolState(store.r, "dynvm")
    barrier.wait()  # type: ignore[attr-defined]
    for j in jobs:
        got = ps.take_warm("cms", IMAGE, f"slurm:c1:{j}", f"job:c1:{j}:0", 1, 1024)
        out.put((j, got[0] if got else None))  # type: ignore[attr-defined]


def test_50_prologs_race_for_10_warm_vms(store: StateStore, redis_url: str) -> None:
    ps = PoolState(store.r, "dynvm")
    for i in range(10):
        pool_vm(store, ps, f"w{i}")
    pool_vm(store, ps, "other-vo", vo="atlas")
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(10), ctx.Queue()
    procs = [ctx.Process(target=_take_many, args=(redis_url, list(range(p * 5, p * 5 + 5)), barrier, out))
             for p in range(10)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in range(50)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    won = {j: iid for j, iid in results if iid is not None}
    assert len(won) == 10 and sorted(won.values()) == [f"w{i}" for i in range(10)]  # each VM to one job
    for j, iid in won.items():
        rec = store.get_instance(iid)
        assert rec is not None and (rec.owner, rec.tier) == (f"slurm:c1:{j}", Tier.WORKER)
        assert store.instance_for_key(f"job:c1:{j}:0") == rec
    assert ps.members("cms") == [] and ps.members("atlas") == ["other-vo"]  # never another VO's VM
    loser = next(j for j, iid in results if iid is None)
    assert ps.take_warm("cms", IMAGE, f"slurm:c1:{loser}", f"job:c1:{loser}:0", 1, 1024) is None
    winner = next(iter(won))
    # A redelivered prolog of a winner gets its own VM again, not a second one.
    again = ps.take_warm("cms", IMAGE, f"slurm:c1:{winner}", f"job:c1:{winner}:0", 1, 1024)
    assert again == (won[winner], False)


def test_take_skips_unready_too_small_other_image_and_drops_ended(store: StateStore) -> None:
    ps = PoolState(store.r, "dynvm")
    pool_vm(store, ps, "booting", state=InstanceState.BOOTING)
    pool_vm(store, ps, "small", vcpus=1)
    pool_vm(store, ps, "old", image="cms-wn:2026.10.0")
    pool_vm(store, ps, "dead", state=InstanceState.FAILED)
    ps.add_member("cms", "vanished")
    assert ps.take_warm("cms", IMAGE, "slurm:c1:1", "job:c1:1:0", 2, 1024) is None
    assert ps.members("cms") == ["booting", "old", "small"]
    assert ps.take_warm("cms", IMAGE, "slurm:c1:1", "job:c1:1:0", 1, 1024) == ("small", True)


def test_retire_and_take_race_hand_each_vm_out_once(store: StateStore) -> None:
    ps = PoolState(store.r, "dynvm")
    for i in range(40):
        pool_vm(store, ps, f"w{i}")
    retired: list[str] = []
    taken: list[str] = []
    go = threading.Barrier(2)

    def retire_all() -> None:
        go.wait()
        retired.extend(f"w{i}" for i in range(40) if ps.retire("cms", f"w{i}", "idle timeout"))

    def take_all() -> None:
        go.wait()
        for j in range(40):
            got = ps.take_warm("cms", IMAGE, f"slurm:c1:{j}", f"job:c1:{j}:0", 1, 1024)
            if got:
                taken.append(got[0])

    ts = [threading.Thread(target=retire_all), threading.Thread(target=take_all)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not set(retired) & set(taken) and len(retired) + len(taken) == 40
    for iid in retired:
        rec = store.get_instance(iid)
        assert rec is not None and rec.owner is None


def test_breaker_counts_each_attempt_once(store: StateStore) -> None:
    bs = BreakerStore(store.r, "dynvm", BreakerSettings(failures=3, backoff_s=1000))
    for attempt in ("a.1", "a.1", "b.1", "b.1", "b.1"):  # redelivered failures
        bs.apply(IMAGE, Ev.FAILURE, "not ready", attempt=attempt)
    assert (bs.get(IMAGE).state, bs.get(IMAGE).failures) == (BState.CLOSED, 2)
    assert bs.apply(IMAGE, Ev.FAILURE, "not ready", attempt="a.2") is not None  # a new epoch is a new boot
    b = bs.get(IMAGE)
    assert (b.state, b.failures) == (BState.OPEN, 3)
    with pytest.raises(CircuitOpenError, match=r"circuit open after 3 failed boots; retry after \d+ s"):
        bs.admit(IMAGE)
    assert list(bs.list()) == [IMAGE]


def test_breaker_concurrent_failures_counted_exactly(store: StateStore) -> None:
    bs = BreakerStore(store.r, "dynvm", BreakerSettings(failures=1000))
    go = threading.Barrier(8)

    errors: list[BaseException] = []

    def fail(t: int) -> None:
        go.wait()
        try:
            for i in range(25):
                bs.apply(IMAGE, Ev.FAILURE, "x", attempt=f"i{i}.{t % 4}")  # each attempt delivered twice
        except BaseException as exc:  # a thread's failure must fail the test, not vanish
            errors.append(exc)

    ts = [threading.Thread(target=fail, args=(t,)) for t in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and bs.get(IMAGE).failures == 100


def test_half_open_lets_exactly_one_probe_through(store: StateStore) -> None:
    bs = BreakerStore(store.r, "dynvm", BreakerSettings(failures=1, backoff_s=0.001, probe_timeout_s=600))
    bs.apply(IMAGE, Ev.FAILURE, "x", attempt="a.1")
    allowed: list[bool] = []
    go = threading.Barrier(10)

    def admit() -> None:
        go.wait()
        try:
            bs.admit(IMAGE)
            allowed.append(True)
        except CircuitOpenError:
            allowed.append(False)

    store.r.hset("dynvm:breaker:" + IMAGE, "retry_at", "0")  # back-off over
    ts = [threading.Thread(target=admit) for _ in range(10)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(allowed) == [False] * 9 + [True]
    assert bs.get(IMAGE).state is BState.HALF_OPEN
    bs.apply(IMAGE, Ev.SUCCESS, attempt="probe.1")
    assert bs.get(IMAGE).state is BState.CLOSED
