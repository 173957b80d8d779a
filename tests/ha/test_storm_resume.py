"""The storm guard holds until an operator resumes, and then the held deaths are acted on (the engine
used to find the same storm every round after `ha resume` and pause again, for ever)."""

from __future__ import annotations

import pytest

from ha.recovery import Step
from provisioner.model import InstanceState
from tests.ha.test_engine_scenarios import run, setup, world

pytestmark = pytest.mark.redis


def test_resume_after_a_storm_lets_the_held_failovers_run(redis_url: str) -> None:
    w = world()
    engine, fence, recs = setup(redis_url, w)
    run(w, engine, fence, 16, {"hv3"})  # hv1 and hv2 die at once: held
    assert w.paused() is not None and w.starts == [] and recs.open_records() == []
    run(w, engine, fence, 10, {"hv3"})
    assert w.starts == []  # still held, however long
    w._paused = None  # dynvm ha resume
    run(w, engine, fence, 20, {"hv3"})
    assert w.paused() is None
    for h in ("hv1", "hv2"):
        rec = recs.get(h)
        assert rec is not None and rec.step is Step.CLOSED, rec
    assert {w.inst[i].state for i in ("ce", "se", "wms")} == {InstanceState.READY}
    assert all(w.inst[i].host == "hv3" for i in ("ce", "se", "wms"))
    assert w.inst["w2"].state is InstanceState.LOST  # hv2 had only a worker: its recovery closes too

