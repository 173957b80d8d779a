"""The engine adopts dead or fenced hosts that no recovery record covers (issue #10: an operator's
`dynvm host fence` of a live host; a leader that died between declaring a death and opening its record),
with the real engine and recovery records (real Redis) over the stateful fake world.

A live-leased fenced host's services start elsewhere only once every service record there says lost (its
own agent destroyed them: provisioner.agent.fencing); the QEMU version is in
tests/ha_qemu/test_fencing_layers.py.
"""

from __future__ import annotations

import pytest

from ha.recovery import Step
from provisioner.model import HostState, InstanceState
from tests.ha.test_engine_scenarios import run, setup, world

pytestmark = pytest.mark.redis
ALL = {"hv1", "hv2", "hv3"}
SERVICES = ("ce", "se", "wms")


def test_an_operator_fenced_live_host_waits_for_its_agent_then_fails_over(redis_url: str) -> None:
    w = world()
    engine, fence, recs = setup(redis_url, w, member="adopt-a")
    run(w, engine, fence, 3, ALL)
    w.hostrec["hv1"].state = HostState.FENCED  # `dynvm host fence hv1 --manual`: its agent still renews
    run(w, engine, fence, 10, ALL)
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.OPEN  # adopted, but nothing is proven gone yet
    assert w.starts == [] and all(w.inst[s].host == "hv1" for s in SERVICES)
    for s in SERVICES:  # its agent destroyed them and said so
        w.inst[s].state = InstanceState.LOST
    run(w, engine, fence, 6, ALL)
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.CLOSED, rec
    assert sorted(i for i, _ in w.starts) == sorted(SERVICES)
    assert all(w.inst[s].state is InstanceState.READY and w.inst[s].host != "hv1" for s in SERVICES)


def test_a_dead_host_without_a_record_is_recovered(redis_url: str) -> None:
    w = world()
    engine, fence, recs = setup(redis_url, w, member="adopt-b")
    run(w, engine, fence, 3, ALL)
    w.hostrec["hv1"].state = HostState.DEAD  # a leader died right after declaring it; no record opened
    run(w, engine, fence, 16, {"hv2", "hv3"})
    rec = recs.get("hv1")
    assert rec is not None and rec.step is Step.CLOSED and sorted(rec.detail["ready"]) == sorted(SERVICES)


def test_a_fenced_host_without_services_opens_nothing(redis_url: str) -> None:
    w = world()
    for s in SERVICES:
        w.inst[s].host = "hv2"
    engine, fence, recs = setup(redis_url, w, member="adopt-c")
    w.hostrec["hv3"].state = HostState.FENCED
    run(w, engine, fence, 5, ALL)
    assert recs.get("hv3") is None and w.starts == []
