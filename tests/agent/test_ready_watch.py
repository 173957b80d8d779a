"""The readiness wait's domain watch and console tail (provisioner.agent.ready), pure logic: a scripted
probe, a scripted domain state and a hand-driven clock.  The real thing (a guest destroyed while it boots
on the QEMU farm) is tests/qemu_e2e/test_qemu_farm.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.agent.ready import DomainStopped, StopsWhenDomainStops, console_tail
from provisioner.catalogue.model import Probe as ProbeSpec
from provisioner.catalogue.model import ProbeType
from provisioner.errors import HypervisorError
from provisioner.interfaces import DomainState
from provisioner.probes import GuestGaveUp, SerialMarkerProbe


class Probe:
    what = "scripted probe"

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.calls = 0

    def check(self) -> bool:
        self.calls += 1
        return self.answers.pop(0) if self.answers else False


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class States:
    def __init__(self, *states: DomainState | Exception) -> None:
        self.states = list(states)
        self.calls = 0

    def __call__(self) -> DomainState:
        self.calls += 1
        s = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(s, Exception):
            raise s
        return s


def test_the_domain_is_looked_at_once_per_period_not_per_sample() -> None:
    clock, states = Clock(), States(DomainState.RUNNING)
    w = StopsWhenDomainStops(Probe([]), states, every_s=1.0, clock=clock)
    for _ in range(10):  # ten samples within the first period: no libvirt call
        clock.t += 0.05
        assert w.check() is False
    assert states.calls == 0
    clock.t += 0.6
    assert w.check() is False
    assert states.calls == 1


@pytest.mark.parametrize("gone", [DomainState.SHUTOFF, DomainState.CRASHED, DomainState.MISSING])
def test_a_stopped_domain_ends_the_wait_naming_its_state(gone: DomainState) -> None:
    clock, states = Clock(), States(DomainState.RUNNING, gone)
    w = StopsWhenDomainStops(Probe([]), states, every_s=1.0, clock=clock)
    clock.t += 1.0
    assert w.check() is False  # running
    clock.t += 1.5
    with pytest.raises(DomainStopped, match=rf"domain {gone.value} 2\.5 s into the readiness wait"):
        w.check()


@pytest.mark.parametrize("other", [DomainState.PAUSED, DomainState.OTHER])
def test_a_paused_or_unknown_domain_is_waited_for(other: DomainState) -> None:
    clock = Clock()
    w = StopsWhenDomainStops(Probe([False, True]), States(other), every_s=1.0, clock=clock)
    clock.t += 2
    assert w.check() is False
    assert w.check() is True


def test_a_libvirt_error_while_looking_is_not_a_stop() -> None:
    clock = Clock()
    states = States(HypervisorError("qemu:///system: libvirtd restarting"), DomainState.SHUTOFF)
    w = StopsWhenDomainStops(Probe([]), states, every_s=1.0, clock=clock)
    clock.t += 1
    assert w.check() is False
    clock.t += 1
    with pytest.raises(DomainStopped):
        w.check()


def test_a_passing_probe_wins_over_a_stopped_domain() -> None:
    # The guest printed its marker and then stopped in the same sample: ready, the health checks take over.
    clock = Clock()
    w = StopsWhenDomainStops(Probe([True]), States(DomainState.SHUTOFF), every_s=1.0, clock=clock)
    clock.t += 5
    assert w.check() is True


def test_console_tail_is_the_last_printed_line_made_printable(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert console_tail(log) == ""  # no log yet
    log.write_bytes(b"")
    assert console_tail(log) == ""
    log.write_bytes(b"x" * 10_000 + b"\nbooting\r\nDYNVM_FAILED se mount /dev/vda\x1b[2J\x07\n\n  \n")
    assert console_tail(log) == "; console: DYNVM_FAILED se mount /dev/vda?[2J?"
    log.write_bytes(b"A" * 500 + b"\n")
    assert console_tail(log, limit=20) == "; console: " + "A" * 20


def test_a_fail_marker_ends_the_wait_with_the_guests_line(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    probe = SerialMarkerProbe(log, "DYNVM_READY se", fail_marker="DYNVM_FAILED se")
    log.write_bytes(b"booting\nDYNVM_FAI")  # split across two samples
    assert probe.check() is False
    with log.open("ab") as f:
        f.write(b"LED se no data disk /dev/vda\x1b[0m\nmore\n")
    with pytest.raises(GuestGaveUp, match=r"printed 'DYNVM_FAILED se no data disk /dev/vda\?\[0m'"):
        probe.check()


def test_the_ready_marker_before_a_fail_marker_is_ready(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"DYNVM_READY se ip=10.0.0.1\nDYNVM_FAILED se later\n")
    assert SerialMarkerProbe(log, "DYNVM_READY se", fail_marker="DYNVM_FAILED se").check() is True
    log.write_bytes(b"DYNVM_FAILED se first\nDYNVM_READY se\n")
    with pytest.raises(GuestGaveUp):
        SerialMarkerProbe(log, "DYNVM_READY se", fail_marker="DYNVM_FAILED se").check()
    assert SerialMarkerProbe(log, "DYNVM_READY se").check() is True  # no fail_marker: as before


def test_fail_marker_belongs_to_serial_marker_probes() -> None:
    ProbeSpec(type=ProbeType.SERIAL_MARKER, marker="DYNVM_READY se", fail_marker="DYNVM_FAILED se")
    with pytest.raises(ValueError, match="fail_marker"):
        ProbeSpec(type=ProbeType.TCP, port=80, fail_marker="DYNVM_FAILED se")
    with pytest.raises(ValueError):
        ProbeSpec(type=ProbeType.SERIAL_MARKER, marker="R", fail_marker="bad'quote")
