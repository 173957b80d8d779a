"""The health probes without a farm: the guest_agent and exec probes against a hand-written guest on a
unix socket (answering, failing, or hung), and make_probe's health-sample timeouts."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.catalogue.model import Probe, ProbeType
from provisioner.errors import DeadlineExceeded, UnavailableError
from provisioner.execchan.client import GRACE_S
from provisioner.probes import ExecProbe, GuestAgentProbe, TcpProbe, exec_within, make_probe


class Guest:
    """The guest side of the exec channel: answers with ``code``, or never when ``hung`` (a paused VM's
    QEMU still accepts the connection; nobody reads it)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen()
        self.code = 0
        self.hung = False
        self.scripts: list[str] = []
        self.timeouts: list[str] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline().decode()
                if self.hung or not line:
                    conn.recv(1)  # hold the connection until the client gives up
                    continue
                _tag, req, tmo, payload = line.split(" ")
                self.scripts.append(base64.b64decode(payload).decode())
                self.timeouts.append(tmo)
                conn.sendall(f"DYNVM-RESULT {req} {self.code}  \n".encode())


@pytest.fixture()
def guest(tmp_path: Path) -> Iterator[tuple[Path, Guest]]:
    path = tmp_path / "exec.sock"
    g = Guest(path)
    yield path, g
    g.sock.close()


def test_guest_agent_probe_passes_on_any_answer_and_fails_on_none(guest: tuple[Path, Guest]) -> None:
    path, g = guest
    probe = GuestAgentProbe(path, timeout=0.3)
    assert probe.check() and g.scripts == ["exec true\n"] and g.timeouts == ["1"]
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
    assert g.scripts[-1] == "exec test -s /data/www/whoami.txt\n"


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
