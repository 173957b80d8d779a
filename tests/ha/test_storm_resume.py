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



def test_a_host_that_missed_a_renewal_counts_as_dying_with_the_dead_one() -> None:
    from ha.detection import Observation, Timing, judge
    from provisioner.model import HostState

    t = Timing(lease_ttl_s=2.0, dead_after_s=2.5, samples=2)

    def obs(h: str, silence: float) -> Observation:
        return Observation(h, HostState.UP, silence, silence <= 2.0, t)

    counts = {"a": 1}
    # b died a renewal period after a: a alone is debounced first, but b has already missed a renewal.
    out = judge([obs("a", 2.6), obs("b", 1.5), obs("c", 0.3), obs("d", 0.1)], counts, storm_share=0.4)
    assert out.storm and out.held == ["a"] and out.dead == []
    # b renewing normally (one renewal late at most): a alone is no storm.
    out = judge([obs("a", 2.6), obs("b", 1.2), obs("c", 0.3), obs("d", 0.1)], counts, storm_share=0.4)
    assert not out.storm and out.dead == ["a"]
