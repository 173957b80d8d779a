"""The agent's health loop when a probe raises (a bug, an error nobody translated): a failed sample that
leaves a trace — the instance and the exception's one line in the log, once per error text and not on
every sample, and as the unhealthy mark's detail and event — instead of a silent "no answer"."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ha.health import Health, HealthStore, Mark
from provisioner.agent.health import HealthLoop
from provisioner.catalogue.model import Probe, ProbeType
from provisioner.model import Instance, InstanceState, Role, Tier
from provisioner.runtime import Runtime
from tests.conftest import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
S = InstanceState
PROBE = Probe(type=ProbeType.GUEST_AGENT, interval_s=0.01, timeout_s=1, failures=2)
LOGGER = "provisioner.agent.health"
RESET = "RuntimeError: libvirt: connection reset by peer"


class Scripted:
    """A probe runner that plays what the test sets: an exception to raise or a verdict to return."""

    what = "scripted probe"

    def __init__(self) -> None:
        self.play: BaseException | bool = True
        self.sampled = 0
        self._lock = threading.Lock()

    def check(self) -> bool:
        with self._lock:
            self.sampled += 1
            play = self.play
        if isinstance(play, BaseException):
            raise play
        return play


@pytest.fixture()
def loop(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HealthLoop, Scripted]]:
    store = rt.store
    store.create_instance(Instance("p1", Role.SERVICE, "ce:1", 1, 256, tier=Tier.CRITICAL, service="ce-01",
                                   created=time.time()))
    assert store.claim("hv1", "p1", 1, 256)
    read = store.transition_from(store.require_instance("p1"), S.PLACED, bump_epoch=True, host="hv1")
    store.transition_from(store.transition_from(read, S.BOOTING), S.READY)
    runner = Scripted()
    hl = HealthLoop(rt, tick_s=0.01)
    monkeypatch.setattr(hl, "_runner", lambda inst: (PROBE, runner))
    yield hl, runner
    hl.close()


def _mark(rt: Runtime) -> Health | None:
    return HealthStore(rt.store.r, rt.store.keys.prefix).get("p1")


def _step_until(hl: HealthLoop, cond: Callable[[], bool], what: str) -> None:
    def stepped() -> bool:
        hl.step()
        return cond()

    wait_until(stepped, timeout=20, interval=0.01, what=what)


def _samples(hl: HealthLoop, runner: Scripted, n: int, what: str) -> None:
    start = runner.sampled
    _step_until(hl, lambda: runner.sampled >= start + n, f"{n} more samples ({what})")


def _logged(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_a_probe_that_raises_is_logged_once_per_error_and_is_the_marks_detail(
    rt: Runtime, loop: tuple[HealthLoop, Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    hl, runner = loop
    caplog.set_level(logging.INFO, logger=LOGGER)
    _samples(hl, runner, 3, "passing")
    assert _mark(rt) is None and _logged(caplog, logging.WARNING) == []

    runner.play = RuntimeError("libvirt: connection reset by peer\n  a second line")
    _step_until(hl, lambda: (m := _mark(rt)) is not None and m.mark is Mark.UNHEALTHY, "unhealthy")
    _samples(hl, runner, 5, "raising the same error")
    mark = _mark(rt)
    assert mark is not None and mark.detail == f"scripted probe: {RESET}"
    ev = [e for e in rt.store.read_events(count=50) if e.kind == "service_unhealthy"]
    assert len(ev) == 1 and ev[0].message.endswith(f": scripted probe: {RESET}"), ev[0].message
    warned = _logged(caplog, logging.WARNING)
    assert len(warned) == 1, warned  # not once per sample
    assert "p1" in warned[0] and RESET in warned[0]
    assert "second line" not in warned[0]

    runner.play = OSError("socket gone")  # another error: said again
    _samples(hl, runner, 5, "raising another error")
    warned = _logged(caplog, logging.WARNING)
    assert len(warned) == 2 and "p1" in warned[1] and "OSError: socket gone" in warned[1], warned

    runner.play = True  # it passes: healthy, and the recovery is said once
    _step_until(hl, lambda: (m := _mark(rt)) is not None and m.mark is Mark.HEALTHY, "healthy again")
    assert len([m for m in _logged(caplog, logging.INFO) if "p1" in m and "passes again" in m]) == 1

    runner.play = False  # a plain failure: the mark says so, not the earlier exception
    _step_until(hl, lambda: (m := _mark(rt)) is not None and m.mark is Mark.UNHEALTHY, "unhealthy (2)")
    mark = _mark(rt)
    assert mark is not None and mark.detail == "scripted probe: no answer"

    runner.play = True
    _step_until(hl, lambda: (m := _mark(rt)) is not None and m.mark is Mark.HEALTHY, "healthy (2)")
    runner.play = RuntimeError("libvirt: connection reset by peer")  # after a pass: logged again
    _samples(hl, runner, 3, "raising after a pass")
    warned = _logged(caplog, logging.WARNING)
    assert len(warned) == 3 and RESET in warned[2], warned
    assert hl.stats.errors == 0, hl.stats.last_error  # a failed sample, not a failed pass of the loop
