"""The probe vocabulary for readiness and health (catalogue ``ProbeType``), and ``wait_ready``.

Every probe has ``check() -> bool`` (one cheap sample, never raises for a "not yet") and ``what`` (a
one-line description for error messages).  ``make_probe`` turns a catalogue ``Probe`` plus what the agent
knows about one instance into a runner.

TCP probes inside a network namespace (the farm's LAN lives in its own namespace): the socket is created
in a short-lived thread that first joins the namespace with setns(2).  A socket stays in the namespace it
was created in, so the connect itself then runs in the caller's thread; only that throw-away thread ever
changes namespace (namespaces are per thread in Linux), and no process is forked per sample, which matters
when a probe polls every 100 ms on a machine whose two cores are full of TCG guests.  ``ip netns exec``
would cost a fork+exec (~10-20 ms under load) per sample.  Joining a namespace needs CAP_SYS_ADMIN, which
the QEMU farm (root) has.
"""

from __future__ import annotations

import base64
import ctypes
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from provisioner.catalogue.model import Probe, ProbeType
from provisioner.errors import DeadlineExceeded, DynvmError, UnavailableError, ValidationError, printable
from provisioner.execchan.client import MAX_TIMEOUT_S, build_script
from provisioner.interfaces import DomainState

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")


class ProbeRunner(Protocol):
    what: str

    def check(self) -> bool:
        """One sample: True when the probe passes."""


def _netns_path(netns: str) -> Path:
    if "/" in netns:
        return Path(netns)
    if not netns or netns in (".", ".."):
        raise ValidationError(f"network namespace name {netns!r} is invalid")
    return NETNS_RUN_DIR / netns


def netns_socket(
    netns: str | None, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket living in network namespace ``netns`` (a name under /run/netns or a path); None = ours."""
    if netns is None:
        return socket.socket(family, kind)
    path = _netns_path(netns)
    result: list[socket.socket | BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.socket(family, kind))
        except BaseException as e:  # handed to the caller's thread below
            result.append(e)

    t = threading.Thread(target=worker, name=f"netns-{path.name}", daemon=True)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        if isinstance(result[0], FileNotFoundError):
            raise UnavailableError(f"network namespace {path} does not exist") from None
        raise UnavailableError(f"cannot enter network namespace {path}: {result[0]}") from None
    return result[0]


class TcpProbe:
    """Passes when ip:port accepts a TCP connection (inside ``netns`` when given)."""

    def __init__(self, ip: str, port: int, netns: str | None = None, connect_timeout: float = 1.0) -> None:
        if not 1 <= port <= 65535:
            raise ValidationError(f"tcp probe: port {port} out of range")
        self.ip, self.port, self.netns, self.connect_timeout = ip, port, netns, connect_timeout
        self.what = f"tcp {ip}:{port}" + (f" in netns {netns}" if netns else "")

    def check(self) -> bool:
        try:
            with netns_socket(self.netns) as s:
                s.settimeout(self.connect_timeout)
                s.connect((self.ip, self.port))
            return True
        except (OSError, UnavailableError):  # no namespace (farm down) is "not ready", too
            return False


class GuestGaveUp(DynvmError):
    """The guest printed its image's ``fail_marker``: it says it cannot become ready (no point waiting)."""


class SerialMarkerProbe:
    """Follows a serial log file for a marker, from ``offset``; each sample reads only the new bytes.

    A file that shrank or was replaced (a restarted guest truncates its log) is followed from its start.
    With ``fail_marker``, a sample that finds it first raises :class:`GuestGaveUp` naming the guest's line.
    """

    def __init__(self, path: str | os.PathLike[str], marker: str, offset: int = 0,
                 fail_marker: str | None = None) -> None:
        if not marker:
            raise ValidationError("serial_marker probe: empty marker")
        self.path = Path(path)
        self.marker = marker.encode()
        self.fail_marker = fail_marker.encode() if fail_marker else None
        self.offset = offset
        self._ino: int | None = None
        self._keep = max(len(self.marker), len(self.fail_marker or b"")) - 1
        self._tail = b""  # the last _keep bytes, for a marker split across two reads
        self.found_at: int | None = None
        self.what = f"serial marker {marker!r} in {self.path}"

    def check(self) -> bool:
        if self.found_at is not None:
            return True
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                if (self._ino is not None and st.st_ino != self._ino) or st.st_size < self.offset:
                    self.offset, self._tail = 0, b""
                self._ino = st.st_ino
                f.seek(self.offset)
                new = f.read(st.st_size - self.offset)
        except FileNotFoundError:
            return False
        data = self._tail + new
        i = data.find(self.marker)
        j = data.find(self.fail_marker) if self.fail_marker else -1
        if j >= 0 and (i < 0 or j < i):
            line = data[j:].split(b"\n", 1)[0].decode("ascii", "replace")
            raise GuestGaveUp(f"{self.path}: the guest printed {printable(line.strip(), 160)!r}")
        if i >= 0:
            self.found_at = self.offset - len(self._tail) + i
        self.offset += len(new)
        self._tail = data[-self._keep:] if self._keep > 0 else b""
        return self.found_at is not None


class DomainStateProbe:
    """Passes when ``state()`` (e.g. ``lambda: hypervisor.state(name)``) returns ``want``."""

    def __init__(self, state: Callable[[], DomainState], want: DomainState = DomainState.RUNNING,
                 what: str = "domain") -> None:
        self.state, self.want = state, want
        self.what = f"{what} state {want.value}"

    def check(self) -> bool:
        try:
            return self.state() is self.want
        except DynvmError:
            return False


MAX_PROBE_REPLY = 1024 * 1024


def exec_within(socket_path: str | os.PathLike[str], argv: list[str], timeout: float) -> int:
    """Run ``argv`` through the guest's serial exec channel and return its exit code, all within ``timeout``
    seconds on the host's clock (``run_in_guest`` adds a grace period for payloads; a probe must not: a
    guest that does not answer in time is the very thing it measures).  The guest's own ``timeout`` ends
    the command at the same deadline.  Raises DeadlineExceeded (no answer in time), UnavailableError (no
    channel, closed before the answer) or ValidationError (a bad argv)."""
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValidationError(f"exec probe: timeout {timeout!r} out of (0, {MAX_TIMEOUT_S:.0f}]")
    text = build_script(argv, None)
    path = Path(socket_path)
    req = secrets.token_hex(8)
    line = f"DYNVM-EXEC {req} {max(1, math.ceil(timeout))} {base64.b64encode(text.encode()).decode()}\n"
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(line.encode())
            buf = b""
            while True:
                while (nl := buf.find(b"\n")) >= 0:
                    parts, buf = buf[:nl].split(b" "), buf[nl + 1 :]
                    if len(parts) >= 3 and parts[0] == b"DYNVM-RESULT" and parts[1] == req.encode():
                        try:
                            return int(parts[2])
                        except ValueError:
                            raise UnavailableError(f"exec channel {path}: garbled exit code") from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(f"exec channel {path}: no answer within {timeout:g} s")
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise UnavailableError(f"exec channel {path}: closed before the answer")
                buf += chunk
                if len(buf) > MAX_PROBE_REPLY:  # a probe's command prints nothing worth 1 MiB
                    raise UnavailableError(f"exec channel {path}: answer longer than {MAX_PROBE_REPLY} bytes")
    except TimeoutError:
        raise DeadlineExceeded(f"exec channel {path}: no answer within {timeout:g} s") from None
    except FileNotFoundError:
        raise UnavailableError(f"exec channel {path}: no such socket (guest not running here?)") from None
    except OSError as e:
        raise UnavailableError(f"exec channel {path}: {e.strerror or e}") from None


class ExecProbe:
    """Passes when the command, run through the guest's serial exec channel, exits 0 within the timeout."""

    def __init__(
        self, socket_path: str | os.PathLike[str], command: list[str], timeout: float = 10.0
    ) -> None:
        if not command:
            raise ValidationError("exec probe: empty command")
        self.socket_path, self.command, self.timeout = Path(socket_path), command, timeout
        self.what = f"exec {' '.join(command)!r} via {self.socket_path}"
        self.last_error = ""

    def check(self) -> bool:
        try:
            code = exec_within(self.socket_path, self.command, self.timeout)
        except (UnavailableError, DeadlineExceeded) as err:
            self.last_error = str(err)
            return False
        self.last_error = "" if code == 0 else f"exit code {code}"
        return code == 0


class GuestAgentProbe(ExecProbe):
    """The guest agent answers: a no-op run through the exec channel (the farm guests' agent, the exec
    runner) comes back within the timeout.  A paused, hung or crashed guest, or one whose agent died,
    fails it; a busy but live guest passes.  Production images with qemu-guest-agent would answer a
    ``guest-ping`` instead; this vocabulary entry is the same."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        super().__init__(socket_path, ["true"], timeout)
        self.what = f"guest agent via {self.socket_path}"


def make_probe(
    spec: Probe,
    *,
    domain_state: Callable[[], DomainState] | None = None,
    serial_log: str | os.PathLike[str] | None = None,
    serial_offset: int = 0,
    ip: str | None = None,
    netns: str | None = None,
    exec_socket: str | os.PathLike[str] | None = None,
    sample_timeout: float | None = None,
) -> ProbeRunner:
    """The runner for a catalogue probe; the keyword arguments are what the agent knows of the instance.

    ``sample_timeout``: how long one sample may wait for an answer.  Health probes give the probe's
    ``timeout_s`` (each sample is a verdict); readiness leaves it None: short samples (1 s TCP connect, at
    most 30 s per exec) polled until the readiness deadline."""
    t = spec.type
    if t is ProbeType.DOMAIN_STATE and domain_state is not None:
        return DomainStateProbe(domain_state)
    if t is ProbeType.SERIAL_MARKER and serial_log is not None and spec.marker:
        return SerialMarkerProbe(serial_log, spec.marker, serial_offset, spec.fail_marker)
    if t is ProbeType.TCP and ip is not None and spec.port is not None:
        return TcpProbe(ip, spec.port, netns, connect_timeout=sample_timeout or 1.0)
    if t is ProbeType.EXEC and exec_socket is not None and spec.command:
        return ExecProbe(exec_socket, spec.command, timeout=sample_timeout or min(spec.timeout_s, 30.0))
    if t is ProbeType.GUEST_AGENT and exec_socket is not None:
        return GuestAgentProbe(exec_socket, timeout=sample_timeout or min(spec.timeout_s, 30.0))
    raise ValidationError(f"probe type {t.value}: needs a domain state, serial log, ip or exec socket")


def wait_ready(probe: ProbeRunner, deadline: float, interval: float = 0.1) -> float:
    """Sample ``probe`` until it passes; ``deadline`` is a ``time.monotonic()`` value.

    Returns the monotonic time it passed; raises DeadlineExceeded naming the probe otherwise.  The probe is
    sampled once more at the deadline, so a guest that became ready just in time is not failed.
    """
    while True:
        if probe.check():
            return time.monotonic()
        now = time.monotonic()
        if now >= deadline:
            raise DeadlineExceeded(f"{probe.what}: not ready by the deadline")
        time.sleep(min(interval, max(0.0, deadline - now)))
