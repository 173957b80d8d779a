"""The health probes without a farm: the guest_agent and exec probes against a hand-written guest on a
unix socket (answering, failing, or hung), and make_probe's health-sample timeouts."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from provisioner.catalogue.model import Probe, ProbeType
from provisioner.errors import DeadlineExceeded, UnavailableError
from provisioner.execchan.client import GRACE_S
from provisioner.probes import ExecProbe, GuestAgentProbe, TcpProbe, exec_within, make_probe
from tests.execchan.fakeguest import FakeGuest, Request, result_line


class Guest(FakeGuest):
    """Answers with exit ``code`` (no output), or never when ``hung``."""

    code = 0

    def answer(self, conn: socket.socket, reader: BinaryIO, req: Request) -> None:
        conn.sendall(result_line(req.id, self.code))


@pytest.fixture()
def guest(tmp_path: Path) -> Iterator[tuple[Path, Guest]]:
    path = tmp_path / "exec.sock"
    g = Guest(path)
    yield path, g
    g.close()


def test_guest_agent_probe_passes_on_any_answer_and_fails_on_none(guest: tuple[Path, Guest]) -> None:
    path, g = guest
    probe = GuestAgentProbe(path, timeout=0.3)
    assert probe.check() and g.requests == [Request("DYNVM-EXEC", g.requests[0].id, 1, "exec true\n")]
    g.hung = True
    started = time.monotonic()
    assert not probe.check()
    assert time.monotonic() - started < GRACE_S  # the probe's own timeout, not the payloads' grace
    assert "no answer within 0.3 s" in probe.last_error
    g.hung = False
    assert probe.check() and probe.last_error == ""


def test_exec_probe_needs_exit_zero(guest: tuple[Path, Guest]) -> None:
    path, g = guest
    probe = ExecProbe(path, ["test", "-s", "/data/www/whoami.txt"], timeout=2)
    assert probe.check()
    g.code = 1
    assert not probe.check() and probe.last_error == "exit code 1"
    assert g.requests[-1].script == "exec test -s /data/www/whoami.txt\n"


def test_exec_within_errors(tmp_path: Path, guest: tuple[Path, Guest]) -> None:
    with pytest.raises(UnavailableError, match="no such socket"):
        exec_within(tmp_path / "gone.sock", ["true"], 1)
    path, g = guest
    g.hung = True
    with pytest.raises(DeadlineExceeded):
        exec_within(path, ["true"], 0.2)
    assert not GuestAgentProbe(tmp_path / "gone.sock", 1).check()


def test_make_probe_for_health_uses_the_sample_timeout(tmp_path: Path) -> None:
    ga = make_probe(Probe(type=ProbeType.GUEST_AGENT, timeout_s=7), exec_socket=tmp_path / "s",
                    sample_timeout=7)
    assert isinstance(ga, GuestAgentProbe) and ga.timeout == 7
    tcp = make_probe(Probe(type=ProbeType.TCP, port=80, timeout_s=4), ip="10.0.0.1", sample_timeout=4)
    assert isinstance(tcp, TcpProbe) and tcp.connect_timeout == 4
    # readiness (no sample timeout): short samples polled until the readiness deadline
    tcp = make_probe(Probe(type=ProbeType.TCP, port=80, timeout_s=120), ip="10.0.0.1")
    assert isinstance(tcp, TcpProbe) and tcp.connect_timeout == 1.0
    ga = make_probe(Probe(type=ProbeType.GUEST_AGENT, timeout_s=120), exec_socket=tmp_path / "s")
    assert isinstance(ga, GuestAgentProbe) and ga.timeout == 30.0
