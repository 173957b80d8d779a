"""Probes and the exec-channel client without a farm (a hand-written fake guest on a unix socket)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from provisioner.catalogue.model import Probe, ProbeType
from provisioner.errors import DeadlineExceeded, UnavailableError, ValidationError
from provisioner.execchan import run_in_guest
from provisioner.interfaces import DomainState
from provisioner.probes import DomainStateProbe, SerialMarkerProbe, TcpProbe, make_probe, wait_ready
from tests.execchan.fakeguest import FakeGuest, Request, result_line


def test_serial_marker_reads_only_new_bytes_and_finds_split_marker(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    probe = SerialMarkerProbe(log, "DYNVM_READY cms-wn")
    assert not probe.check()  # no file yet
    log.write_bytes(b"booting...\nDYNVM_REA")
    assert not probe.check()
    assert probe.offset == log.stat().st_size
    with log.open("ab") as f:
        f.write(b"DY cms-wn vo=cms\n")
    assert probe.check()
    assert probe.found_at == len(b"booting...\n")


def test_serial_marker_restarts_on_truncated_log(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"x" * 100 + b"old run\n")
    probe = SerialMarkerProbe(log, "READY", offset=0)
    assert not probe.check()
    log.write_bytes(b"READY\n")  # a restarted guest truncates its log (append='off')
    assert probe.check()


def test_wait_ready_deadline_names_probe(tmp_path: Path) -> None:
    probe = SerialMarkerProbe(tmp_path / "none.log", "READY")
    with pytest.raises(DeadlineExceeded, match=r"none\.log"):
        wait_ready(probe, time.monotonic() + 0.2, interval=0.05)


def test_tcp_probe_and_domain_state_probe() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert TcpProbe("127.0.0.1", port).check()
    assert not TcpProbe("127.0.0.1", port, connect_timeout=0.5).check()
    states = iter([DomainState.SHUTOFF, DomainState.RUNNING])
    probe = DomainStateProbe(lambda: next(states))
    assert not probe.check() and probe.check()


def test_tcp_probe_in_missing_netns_fails_cleanly() -> None:
    assert not TcpProbe("10.77.0.10", 80, netns="dynvm-no-such-ns").check()


def test_make_probe_maps_catalogue_types(tmp_path: Path) -> None:
    p = make_probe(Probe(type=ProbeType.SERIAL_MARKER, marker="X"), serial_log=tmp_path / "l")
    assert isinstance(p, SerialMarkerProbe)
    assert isinstance(make_probe(Probe(type=ProbeType.TCP, port=80), ip="10.0.0.1", netns="n"), TcpProbe)
    with pytest.raises(ValidationError, match="tcp"):
        make_probe(Probe(type=ProbeType.TCP, port=80))
    with pytest.raises(ValidationError, match="guest_agent"):
        make_probe(Probe(type=ProbeType.GUEST_AGENT))


class StaleFirst(FakeGuest):
    """Answers exit 5 with ``out:<script>``, after a stale reply (another request's) to test id matching."""

    def answer(self, conn: socket.socket, reader: BinaryIO, req: Request) -> None:
        out = b"out:" + req.script.encode()
        conn.sendall(result_line("stale", 0, out) + result_line(req.id, 5, out))


@pytest.fixture()
def fake_guest(tmp_path: Path) -> Iterator[tuple[Path, FakeGuest]]:
    path = tmp_path / "g.sock"
    g = StaleFirst(path)
    yield path, g
    g.close()


def test_run_in_guest_quotes_argv_and_skips_stale_replies(fake_guest: tuple[Path, FakeGuest]) -> None:
    path, guest = fake_guest
    res = run_in_guest(path, ["echo", "a b", "it's"], timeout=5)
    assert [r.script for r in guest.requests] == ["exec echo 'a b' 'it'\"'\"'s'\n"]
    assert res.exit_code == 5 and res.stdout.startswith("out:exec echo")


@pytest.mark.parametrize(
    ("argv", "script", "timeout", "match"),
    [
        (None, None, 5, "exactly one"),
        (["a"], "b", 5, "exactly one"),
        ([], None, 5, "non-empty list"),
        (["a\x00"], None, 5, "NUL"),
        (None, "x" * 70000, 5, "longer"),
        (["true"], None, 0, "timeout"),
    ],
)
def test_run_in_guest_validates(tmp_path: Path, argv: list[str] | None, script: str | None, timeout: float,
                                match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        run_in_guest(tmp_path / "x.sock", argv, script=script, timeout=timeout)


def test_run_in_guest_without_socket_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="no such socket"):
        run_in_guest(tmp_path / "gone.sock", ["true"], timeout=5)
