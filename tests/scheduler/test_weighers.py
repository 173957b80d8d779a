"""Weighers: least_loaded spreads, pack fills; ties go to the first host by name."""

from __future__ import annotations

import pytest

from provisioner.errors import ValidationError
from provisioner.scheduler import SchedulerPolicy, Snapshot, schedule
from tests.scheduler.factory import host, req, snap, vm


def three_hosts() -> Snapshot:
    # a: 6/8 used, b: 2/8 used, c: 4/8 used (vCPU and memory alike)
    hosts = [host("a", 8, 8192), host("b", 8, 8192), host("c", 8, 8192)]
    return snap(hosts, [vm("x", "a", 6, 6144), vm("y", "b", 2, 2048), vm("z", "c", 4, 4096)])


@pytest.mark.parametrize(
    ("weigher", "expected"),
    [("least_loaded", "b"), ("pack", "a")],
)
def test_weigher_choice(weigher: str, expected: str) -> None:
    plan = schedule([req("n", 1, 1024)], three_hosts(), SchedulerPolicy(weigher=weigher))  # type: ignore[arg-type]
    assert plan.placements == {"n": expected}


def test_pack_skips_host_that_does_not_fit() -> None:
    plan = schedule([req("n", 3, 1024)], three_hosts(), SchedulerPolicy(weigher="pack"))
    assert plan.placements == {"n": "c"}


def test_least_loaded_weighs_memory_too() -> None:
    # Same vCPU use; b has far less memory in use, so least_loaded prefers it.
    s = snap([host("a", 8, 8192), host("b", 8, 8192)], [vm("x", "a", 2, 6000), vm("y", "b", 2, 1000)])
    assert schedule([req("n")], s).placements == {"n": "b"}


def test_tie_breaks_by_host_name() -> None:
    s = snap([host("c"), host("a"), host("b")])
    assert schedule([req("n")], s).placements == {"n": "a"}


def test_least_loaded_spreads_a_batch() -> None:
    s = snap([host("a"), host("b"), host("c")])
    plan = schedule([req(f"n{i}", 2) for i in range(3)], s)
    assert sorted(plan.placements.values()) == ["a", "b", "c"]


def test_pack_fills_one_host_first() -> None:
    s = snap([host("a"), host("b"), host("c")])
    plan = schedule([req(f"n{i}", 2) for i in range(4)], s, SchedulerPolicy(weigher="pack"))
    assert set(plan.placements.values()) == {"a"}


def test_unknown_weigher_is_an_error() -> None:
    with pytest.raises(ValidationError, match="weigher"):
        schedule([req("n")], snap([host("a")]), SchedulerPolicy(weigher="random"))  # type: ignore[arg-type]
