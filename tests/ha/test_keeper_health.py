"""Service health decisions, row by row (pure): the agent's sample counter, the keeper's verdict on a hung
VM (restart in place under the limit, relocate past it) and the re-placement of the VM its agent stopped;
then the whole chain played through the same functions."""

from __future__ import annotations

import dataclasses

import pytest

from ha.health import Counter, Health, Mark, sample
from ha.keeper import Hung, Limits, Start, decide, decide_hung
from ha.services import Service
from provisioner.model import HostState, Instance, InstanceState, Role, Tier

S = InstanceState
UP = {"hv1": HostState.UP, "hv2": HostState.UP}
CE = Service("ce-01", "ce", Tier.CRITICAL)
LIM = {"ce-01": Limits(max_restarts=2, window_s=600)}


def rec(state: InstanceState, host: str | None = "hv1", epoch: int = 3, iid: str = "a") -> Instance:
    return Instance(iid, Role.SERVICE, "ce:1", 1, 256, state, Tier.CRITICAL, host=host, service="ce-01",
                    epoch=epoch, updated=1.0)


def mark(m: Mark, epoch: int = 3, failures: int = 3) -> dict[str, Health]:
    return {"a": Health(m, epoch, failures, 99.0, "guest agent: no answer")}


# -- the agent's counter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "threshold", "marks", "failures_after"),
    [
        ("ok ok ok", 3, [], 0),
        ("bad bad", 3, [], 2),
        ("bad bad bad", 3, [Mark.UNHEALTHY], 3),
        ("bad bad ok bad bad", 3, [], 2),  # not in a row: never unhealthy
        ("bad bad bad bad bad", 3, [Mark.UNHEALTHY], 5),  # said once, not on every failure
        ("bad bad bad ok", 3, [Mark.UNHEALTHY, Mark.HEALTHY], 0),
        ("bad", 1, [Mark.UNHEALTHY], 1),
        ("bad ok bad", 1, [Mark.UNHEALTHY, Mark.HEALTHY, Mark.UNHEALTHY], 1),
    ],
)
def test_counter(samples: str, threshold: int, marks: list[Mark], failures_after: int) -> None:
    c, out = Counter(epoch=7), []
    for s in samples.split():
        c, change = sample(c, s == "ok", threshold)
        if change is not None:
            out.append(change)
    assert out == marks and c.failures == failures_after and c.epoch == 7


# -- the keeper's verdict on a hung VM ---------------------------------------------------------------------

RESTART_1 = Hung("ce-01", "a", "hv1", 3, Mark.RESTART,
                 "unhealthy on hv1 (3 failed probes: guest agent: no answer): restart in place (1/2)")


@pytest.mark.parametrize(
    ("insts", "health", "hosts", "restarts", "limits", "want"),
    [
        # unhealthy, under the limit: restart in place, counted k/max
        ([rec(S.READY)], mark(Mark.UNHEALTHY), UP, [], LIM, [RESTART_1]),
        ([rec(S.READY)], mark(Mark.UNHEALTHY), UP, [50.0], LIM, [dataclasses.replace(
            RESTART_1, why=RESTART_1.why.replace("(1/2)", "(2/2)"))]),
        # at the limit within the window: relocate
        ([rec(S.READY)], mark(Mark.UNHEALTHY), UP, [50.0, 60.0], LIM, ["relocate"]),
        # restarts older than the window no longer count
        ([rec(S.READY)], mark(Mark.UNHEALTHY), UP, [-900.0, -800.0], LIM, ["restart"]),
        # an image that allows no restart in place relocates at once
        ([rec(S.READY)], mark(Mark.UNHEALTHY), UP, [], {"ce-01": Limits(0, 600)}, ["relocate"]),
        # a draining host sends it elsewhere; maintenance (HA disarmed), suspect and dead hosts: nothing
        ([rec(S.READY)], mark(Mark.UNHEALTHY), {"hv1": HostState.DRAINING}, [], LIM, ["relocate"]),
        ([rec(S.READY)], mark(Mark.UNHEALTHY), {"hv1": HostState.MAINTENANCE}, [], LIM, []),
        ([rec(S.READY)], mark(Mark.UNHEALTHY), {"hv1": HostState.SUSPECT}, [], LIM, []),
        ([rec(S.READY)], mark(Mark.UNHEALTHY), {"hv1": HostState.DEAD}, [], LIM, []),
        # healthy, no mark, or a mark about an earlier placement: nothing
        ([rec(S.READY)], mark(Mark.HEALTHY), UP, [], LIM, []),
        ([rec(S.READY)], {}, UP, [], LIM, []),
        ([rec(S.READY, epoch=4)], mark(Mark.UNHEALTHY, epoch=3), UP, [], LIM, []),
        # already decided (waiting for the agent): not decided again, not counted again
        ([rec(S.READY)], mark(Mark.RESTART), UP, [], LIM, []),
        ([rec(S.READY)], mark(Mark.RELOCATE), UP, [], LIM, []),
        # not ready (booting, migrating): its probes do not run; no decision
        ([rec(S.BOOTING)], mark(Mark.UNHEALTHY), UP, [], LIM, []),
        ([rec(S.MIGRATING)], mark(Mark.UNHEALTHY), UP, [], LIM, []),
        # two live VMs of one service: a duplicate to report (decide does), never a restart
        ([rec(S.READY), rec(S.READY, "hv2", iid="b")], mark(Mark.UNHEALTHY), UP, [], LIM, []),
    ],
)
def test_decide_hung(insts: list[Instance], health: dict[str, Health], hosts: dict[str, HostState],
                     restarts: list[float], limits: dict[str, Limits], want: list[object]) -> None:
    got = decide_hung([CE], insts, hosts, {"ce-01": restarts}, limits, 100.0, health)
    if want and isinstance(want[0], str):
        assert [h.mark.value for h in got] == want
        assert all(h.instance == "a" and h.host == "hv1" and h.epoch == 3 for h in got)
    else:
        assert got == want


def test_relocation_says_why() -> None:
    (h,) = decide_hung([CE], [rec(S.READY)], UP, {"ce-01": [50.0, 60.0]}, LIM, 100.0, mark(Mark.UNHEALTHY))
    assert h.why.endswith("relocating, 2 restarts in place within 600 s (limit 2)")


# -- re-placing the VM the agent stopped ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "health", "hosts", "recovering", "want"),
    [
        # stopped for a restart, host up: the same record, pinned to its host
        (rec(S.LOST), mark(Mark.RESTART), UP, frozenset(),
         Start("ce-01", "hv1", "hung on hv1: restarting in place", instance="a")),
        # stopped for a restart but the host is no longer up: relocated instead
        (rec(S.LOST), mark(Mark.RESTART), {"hv1": HostState.DRAINING}, frozenset(),
         Start("ce-01", None, "hung on hv1: relocating", instance="a", avoid="hv1")),
        # stopped for a relocation: the same record, anywhere but hv1
        (rec(S.LOST), mark(Mark.RELOCATE), UP, frozenset(),
         Start("ce-01", None, "hung on hv1: relocating", instance="a", avoid="hv1")),
        # the host died meanwhile: its failover owns the record
        (rec(S.LOST), mark(Mark.RELOCATE), UP, frozenset({"hv1"}), None),
        # a mark of an earlier placement is no mark: the ordinary path (a new VM, in place, counted)
        (rec(S.LOST, epoch=4), mark(Mark.RESTART, epoch=3), UP, frozenset(),
         Start("ce-01", "hv1", "lost on hv1: restart in place (1/2)")),
        # ready again (re-placed, booted): nothing to start
        (rec(S.READY, epoch=5), mark(Mark.RESTART, epoch=3), UP, frozenset(), None),
    ],
)
def test_decide_replaces_the_stopped_record(last: Instance, health: dict[str, Health],
                                            hosts: dict[str, HostState], recovering: frozenset[str],
                                            want: Start | None) -> None:
    starts, problems = decide([CE], [last], hosts, {}, LIM, 100.0, recovering, health)
    assert starts == ([want] if want else []) and problems == []


# -- the whole chain ---------------------------------------------------------------------------------------


def test_hang_restart_in_place_until_the_limit_then_relocate() -> None:
    """Play the chain with the pure functions, the agent's and the world's parts done by hand; the
    restart history grows only by the keeper's restart decisions."""
    inst = rec(S.READY, epoch=1)
    restarts: list[float] = []
    now = 1000.0
    log: list[str] = []
    for _ in range(3):  # hangs 1 and 2: restarted in place; hang 3: past the limit of 2
        # the agent: three failed samples in a row make it unhealthy
        c: Counter = Counter(inst.epoch)
        for _ in range(3):
            c, change = sample(c, False, 3)
        assert change is Mark.UNHEALTHY
        health = {inst.id: Health(Mark.UNHEALTHY, inst.epoch, c.failures)}
        (hung,) = decide_hung([CE], [inst], UP, {"ce-01": restarts}, LIM, now, health)
        if hung.mark is Mark.RESTART:
            restarts.append(now)
        # nothing starts while the hung VM is still ready
        assert decide([CE], [inst], UP, {"ce-01": restarts}, LIM, now, frozenset(),
                      {inst.id: Health(hung.mark, inst.epoch)}) == ([], [])
        # the agent destroyed it and recorded it lost (same epoch, the mark stays)
        lost = dataclasses.replace(inst, state=S.LOST)
        health = {inst.id: Health(hung.mark, inst.epoch)}
        (st,) = decide([CE], [lost], UP, {"ce-01": restarts}, LIM, now, frozenset(), health)[0]
        assert st.instance == inst.id
        log.append(f"{hung.mark.value}->{st.host or 'elsewhere'}")
        # re-placed and booted: a new epoch, on st.host or another host
        inst = dataclasses.replace(inst, state=S.READY, host=st.host or "hv2", epoch=inst.epoch + 2)
        now += 30
    assert log == ["restart->hv1", "restart->hv1", "relocate->elsewhere"]
    assert inst.host == "hv2" and len(restarts) == 2
