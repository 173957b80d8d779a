"""Detection verdicts: table-driven, one row per case; debounce and the storm guard over rounds."""

from __future__ import annotations

import pytest

from ha.detection import Observation, Timing, Verdict, classify, heard_at, judge
from provisioner.model import HostState

CRIT = Timing(lease_ttl_s=0.5, dead_after_s=1.0, samples=2)
STD = Timing(lease_ttl_s=3.0, dead_after_s=5.0, samples=2)


def obs(
    host: str, silence: float, alive: bool = True, state: HostState = HostState.UP, t: Timing = CRIT
) -> Observation:
    return Observation(host, state, silence, alive, t)


@pytest.mark.parametrize(
    ("observation", "expected"),
    [
        (obs("a", 0.1), Verdict.ALIVE),
        (obs("a", 0.5), Verdict.ALIVE),  # exactly at the lease boundary
        (obs("a", 0.6), Verdict.LATE),  # lease key may still exist; renewal is late
        (obs("a", 0.2, alive=False), Verdict.LATE),  # lease gone but within dead_after
        (obs("a", 1.01, alive=False), Verdict.SILENT),
        (obs("a", 1.01, alive=True), Verdict.SILENT),  # a lease alive but silent that long: trust silence
        (obs("a", 4.0, t=STD), Verdict.LATE),  # same silence, slower class
        (obs("a", 9.0, state=HostState.MAINTENANCE), Verdict.IGNORED),
        (obs("a", 9.0, state=HostState.DEAD), Verdict.IGNORED),
        (obs("a", 9.0, state=HostState.FENCED), Verdict.IGNORED),
        (obs("a", 9.0, state=HostState.DRAINING), Verdict.SILENT),
        (obs("a", 9.0, state=HostState.SUSPECT), Verdict.SILENT),
    ],
)
def test_classify(observation: Observation, expected: Verdict) -> None:
    assert classify(observation) is expected


def test_one_late_observation_is_not_a_death() -> None:
    first = judge([obs("a", 2.0, alive=False), obs("b", 0.1), obs("c", 0.1)], {}, storm_share=0.5)
    assert first.verdicts["a"] is Verdict.SILENT and first.dead == []
    # a renews again: the count is gone from the next round's input
    second = judge([obs("a", 0.1), obs("b", 0.1), obs("c", 0.1)], first.counts, storm_share=0.5)
    assert second.verdicts["a"] is Verdict.ALIVE and second.counts == {}
    third = judge([obs("a", 2.0, alive=False), obs("b", 0.1), obs("c", 0.1)], second.counts, 0.5)
    assert third.dead == []


def test_silent_for_samples_rounds_is_dead() -> None:
    counts: dict[str, int] = {}
    verdicts = []
    for _ in range(3):
        out = judge([obs("a", 2.0, alive=False), obs("b", 0.1), obs("c", 0.1)], counts, storm_share=0.5)
        counts = out.counts
        verdicts.append(out.verdicts["a"])
    assert verdicts == [Verdict.SILENT, Verdict.DEAD, Verdict.DEAD]


def test_storm_guard_holds_when_too_many_die_at_once() -> None:
    rows = [obs(h, 2.0, alive=False) for h in ("a", "b")] + [obs("c", 0.1), obs("d", 0.1)]
    out = judge(rows, {"a": 1, "b": 1}, storm_share=0.34)
    assert out.storm and out.dead == [] and out.held == ["a", "b"]
    # the same two deaths among many hosts are no storm
    rows += [obs(h, 0.1) for h in "efgh"]
    out = judge(rows, {"a": 1, "b": 1}, storm_share=0.34)
    assert not out.storm and out.dead == ["a", "b"]


def test_hosts_already_dead_count_towards_the_storm() -> None:
    rows = [obs("a", 2.0, alive=False), obs("b", 0.1), obs("c", 0.1)]
    assert judge(rows, {"a": 1}, storm_share=0.4).dead == ["a"]
    out = judge(rows, {"a": 1}, storm_share=0.4, already_dead=1)
    assert out.storm and out.held == ["a"]


def test_heard_by_peers_is_cut_off_not_dead() -> None:
    from ha.detection import heard_by_majority

    o = Observation("a", HostState.UP, 5.0, False, CRIT, heard_by_peers=True)
    assert classify(o) is Verdict.CUT_OFF
    assert judge([o], {"a": 5}, storm_share=0.9).dead == []
    live = {"b", "c", "d"}
    assert heard_by_majority("a", {"b": ["a"], "c": ["a", "d"]}, live)
    assert not heard_by_majority("a", {"b": ["a"]}, live)  # 1 of 3 is no majority
    assert not heard_by_majority("a", {"b": ["a"], "c": ["a"], "x": ["a"]}, {"b"} | {"d", "e", "f"})
    assert not heard_by_majority("a", {}, set())  # nobody left to ask


@pytest.mark.parametrize(
    ("state", "last_seen", "watched_since", "expected"),
    [
        (HostState.UP, 100.0, 0.0, 100.0),  # never left watch: its renewal
        (HostState.UP, 100.0, 120.0, 120.0),  # back (rejoin) before its agent renewed: from its return
        (HostState.DRAINING, 100.0, 120.0, 120.0),
        (HostState.SUSPECT, 100.0, 120.0, 120.0),
        (HostState.UP, 121.5, 120.0, 121.5),  # renewed since its return: its renewals again
        (HostState.MAINTENANCE, 100.0, 120.0, 100.0),  # out of watch: not judged anyway
        (HostState.FENCED, 100.0, 120.0, 100.0),
    ],
)
def test_a_host_back_in_watch_is_judged_from_its_return_until_it_renews(
    state: HostState, last_seen: float, watched_since: float, expected: float
) -> None:
    assert heard_at(state, last_seen, watched_since) == expected


def test_counted_from_its_return_a_host_that_never_renews_is_still_caught() -> None:
    back = heard_at(HostState.UP, 100.0, 120.0)
    assert classify(obs("a", 121.0 - back, t=STD)) is Verdict.ALIVE  # 21 s from its renewal: was SILENT
    assert classify(obs("a", 126.0 - back, t=STD)) is Verdict.SILENT  # never renews: dead_after_s later
