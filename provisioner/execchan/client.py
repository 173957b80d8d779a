"""Host side of the `serial` exec method (the guest side is images/build/guest/exec-runner.sh).

Each guest has one virtio-serial port named ``org.dynvm.exec.0`` whose host end is a unix socket that only
that guest's QEMU listens on (``<channel type='unix'><source mode='bind' path=.../>``), so a job sent to
one guest can never be read by another.  Protocol, one line each way, base64 so that no job output can break
the framing:

    host  -> guest: ``DYNVM-EXEC <id> <timeout_s> <base64 script>\\n``
    guest -> host : ``DYNVM-RESULT <id> <exit_code> <base64 stdout> <base64 stderr>\\n``

The id is random per request: a reply left over from an earlier client that gave up is skipped.  QEMU
serves one socket connection at a time, which serialises concurrent callers.  The guest enforces the
timeout with busybox ``timeout`` (the job then ends with 143, SIGTERM); the host gives up a grace period
later with DeadlineExceeded.  ``timeout=None`` is a batch payload: no host-side deadline at all (the batch
system's walltime is the limit; a job may run for days) and the longest guest-side limit busybox takes.

Callers connect to the socket themselves (``dynvm exec``, the batch payload wrapper): no payload ever
crosses a queue that could redeliver it (DESIGN.md, "No payload in the control plane").

That one-line protocol returns the output only at the end, capped at 1 MiB per stream: it serves probes
and short commands (``run_in_guest``).  Payloads use the streaming protocol of provisioner.execchan.frames
(``stream_in_guest``): numbered chunks while the job runs, acknowledged once written, no size cap, bounded
memory on both sides, and resumable from a cursor after the client died (``attach``).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import shlex
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import DeadlineExceeded, UnavailableError, ValidationError

EXEC_PORT_NAME = "org.dynvm.exec.0"
# provisioner.state.keys.ID_RE, repeated: this module is on the batch hooks' light path (no redis import).
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_SCRIPT_BYTES = 64 * 1024
MAX_REPLY_BYTES = 4 * 1024 * 1024  # the guest caps stdout and stderr at 1 MiB each (base64: 4/3 of that)
MAX_TIMEOUT_S = 7 * 24 * 3600.0
UNLIMITED_GUEST_S = 365 * 24 * 3600  # what the guest's busybox timeout gets for timeout=None (fits 32 bits)
GRACE_S = 10.0  # a busy TCG guest needs a moment after its own timeout to report


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str = ""
    duration_s: float = 0.0

    @property
    def timed_out(self) -> bool:
        """The guest killed the job at its deadline (busybox timeout sends SIGTERM: 128 + 15)."""
        return self.exit_code == 143


def build_script(argv: list[str] | None, script: str | None) -> str:
    """Exactly one of argv (quoted, exec'd) or a shell script; validated."""
    if (argv is None) == (script is None):
        raise ValidationError("run_in_guest: give exactly one of argv or script")
    if argv is not None:
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValidationError(f"run_in_guest: argv must be a non-empty list of strings, got {argv!r}")
        text = "exec " + " ".join(shlex.quote(a) for a in argv) + "\n"
    else:
        if not isinstance(script, str) or not script.strip():
            raise ValidationError("run_in_guest: script must be a non-empty string")
        text = script
    if "\x00" in text:
        raise ValidationError("run_in_guest: the command contains a NUL byte")
    if len(text.encode()) > MAX_SCRIPT_BYTES:
        raise ValidationError(f"run_in_guest: the command is longer than {MAX_SCRIPT_BYTES} bytes")
    return text


def _check_socket(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnavailableError(f"exec channel {path}: no such socket (guest not running here?)") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValidationError(f"exec channel {path}: not a unix socket")


def exec_socket(shared_dir: str | os.PathLike[str], instance_id: str, host: str) -> Path:
    """Where the host end of ``instance_id``'s exec channel is while it runs on ``host``: per instance, per
    host (a live migration has one socket on each side).  The agent binds QEMU's channel to this path."""
    for value, what in ((instance_id, "instance id"), (host, "host name")):
        if not isinstance(value, str) or not _ID_RE.fullmatch(value):
            raise ValidationError(f"{what} {value!r:.64} is malformed (expected {_ID_RE.pattern})")
    return Path(shared_dir) / "run" / instance_id / f"exec-{host}.sock"


def _read_reply(sock: socket.socket, req_id: str, deadline: float | None, path: Path) -> list[str]:
    buf = b""
    while True:
        nl = buf.find(b"\n")
        while nl >= 0:
            line, buf = buf[:nl].decode("ascii", "replace"), buf[nl + 1 :]
            parts = line.split(" ")
            if len(parts) == 5 and parts[0] == "DYNVM-RESULT" and parts[1] == req_id:
                return parts
            nl = buf.find(b"\n")  # a stale reply of an earlier, abandoned request: skip it
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"exec channel {path}: no reply to request {req_id} in time")
        sock.settimeout(remaining)  # None: block as long as the job runs; a dead QEMU closes the socket
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise DeadlineExceeded(f"exec channel {path}: no reply to request {req_id} in time") from None
        if not chunk:
            raise UnavailableError(f"exec channel {path}: closed before the reply (guest gone?)")
        buf += chunk
        if len(buf) > MAX_REPLY_BYTES:
            raise UnavailableError(f"exec channel {path}: reply longer than {MAX_REPLY_BYTES} bytes")


def _decode(field: str, path: Path) -> str:
    try:
        return base64.b64decode(field, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        raise UnavailableError(f"exec channel {path}: garbled reply (bad base64)") from None


def run_in_guest(
    socket_path: str | os.PathLike[str],
    argv: list[str] | None = None,
    *,
    script: str | None = None,
    timeout: float | None = 60.0,
) -> ExecResult:
    """Run argv (or a shell script) in the guest behind ``socket_path``; return its exit code and output.

    ``timeout=None``: no deadline (a batch payload; the batch system's walltime bounds it)."""
    text = build_script(argv, script)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise ValidationError(f"run_in_guest: timeout must be in (0, {MAX_TIMEOUT_S:.0f}] s, got {timeout!r}")
    path = Path(socket_path)
    _check_socket(path)
    req_id = secrets.token_hex(8)
    guest_timeout = UNLIMITED_GUEST_S if timeout is None else max(1, int(timeout + 0.999))
    payload = base64.b64encode(text.encode()).decode()
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout + GRACE_S
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30.0 if deadline is None else max(0.1, deadline - time.monotonic()))
        try:
            sock.connect(str(path))
            sock.sendall(f"DYNVM-EXEC {req_id} {guest_timeout} {payload}\n".encode())
        except TimeoutError:
            raise DeadlineExceeded(f"exec channel {path}: could not send request in time") from None
        except OSError as e:
            raise UnavailableError(f"exec channel {path}: {e.strerror or e}") from None
        parts = _read_reply(sock, req_id, deadline, path)
    try:
        code = int(parts[2])
    except ValueError:
        raise UnavailableError(f"exec channel {path}: garbled exit code {parts[2]!r}") from None
    return ExecResult(code, _decode(parts[3], path), _decode(parts[4], path), time.monotonic() - started)


@dataclass(frozen=True, slots=True)
class StreamResult:
    exit_code: int
    run_id: str
    out_bytes: int
    err_bytes: int
    duration_s: float = 0.0
    duplicates: int = 0  # chunks received twice (resends) and dropped
    gaps: int = 0  # times a chunk was missing and a resend was asked for


Sink = Callable[[bytes], object]


def stream_in_guest(
    socket_path: str | os.PathLike[str],
    argv: list[str] | None = None,
    *,
    script: str | None = None,
    timeout: float | None = None,
    out: Sink,
    err: Sink,
    attach: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    merge: bool = False,
) -> StreamResult:
    """Run argv (or a script) in the guest and hand its stdout/stderr to ``out``/``err`` chunk by chunk
    while it runs; returns its exit code.  ``attach="RUN:NEXT_OUT:NEXT_ERR"`` instead resumes a run that an
    earlier client started (the cursor that client last reported through ``on_progress``): the chunks
    from there on arrive exactly once.  A sink must have written its chunk when it returns (the guest then
    drops it); ``on_progress`` gets the cursor text once the run is asked for and after each chunk.
    ``timeout=None``: no deadline.  ``merge=True``: the job's stderr goes to its stdout in the guest (one
    stream, in print order: for output that ends up in one file, see ``same_file``)."""
    from provisioner.execchan import frames as fr

    if attach is not None:
        if argv is not None or script is not None:
            raise ValidationError("stream_in_guest: attach resumes a run; give no command with it")
        try:
            cursor = fr.Cursor.parse(attach)
        except ValueError as e:
            raise ValidationError(f"--attach: {e}") from None
        first = fr.attach_line(cursor.run_id, cursor.next_out, cursor.next_err)
    else:
        text = build_script(argv, script)
        cursor = fr.Cursor(secrets.token_hex(8))
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_S
    ):
        limit = f"(0, {MAX_TIMEOUT_S:.0f}] s"
        raise ValidationError(f"stream_in_guest: timeout must be in {limit}, got {timeout!r}")
    if attach is None:
        guest_timeout = UNLIMITED_GUEST_S if timeout is None else max(1, int(timeout + 0.999))
        first = fr.run_line(cursor.run_id, guest_timeout, text.encode(), merge)
    path = Path(socket_path)
    _check_socket(path)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout + GRACE_S
    rx = fr.Receiver(cursor)
    lines = fr.LineSplitter()
    sizes = {"o": 0, "e": 0}
    sinks = {"o": out, "e": err}

    def lost(why: str) -> str:
        return f"exec channel {path}: {why} (resume with --attach {cursor.text()})"

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30.0 if deadline is None else max(0.1, deadline - time.monotonic()))
        try:
            sock.connect(str(path))
            sock.sendall(first)
        except TimeoutError:
            raise DeadlineExceeded(f"exec channel {path}: could not send request in time") from None
        except OSError as e:
            raise UnavailableError(f"exec channel {path}: {e.strerror or e}") from None
        if on_progress is not None:
            on_progress(cursor.text())  # the run id, before any output: enough to resume from the start
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(lost(f"run {cursor.run_id} did not end in time"))
            sock.settimeout(remaining)
            try:
                data = sock.recv(262144)
            except TimeoutError:
                raise DeadlineExceeded(lost(f"run {cursor.run_id} did not end in time")) from None
            except OSError as e:
                raise UnavailableError(lost(f"{e.strerror or e}")) from None
            if not data:
                raise UnavailableError(lost(f"closed while run {cursor.run_id} streamed (guest gone?)"))
            # One ACK per stream for what this read delivered (the latest covers the earlier ones): the
            # guest's reading loop handles fewer lines.  Any other reply goes out after the ACKs before it.
            acks: dict[str, bytes] = {}
            for line in lines.feed(data):
                frame = fr.parse_line(line, cursor.run_id)
                if frame is None:
                    continue
                try:
                    step = rx.feed(frame, time.monotonic())
                except fr.ProtocolError as e:
                    if e.kind == "busy":
                        from provisioner.errors import ConflictError

                        raise ConflictError(f"exec channel {path}: {e}") from None
                    raise UnavailableError(f"exec channel {path}: {e}") from None
                if step.data:
                    sinks[step.stream](step.data)
                    sizes[step.stream] += len(step.data)
                if step.stream and on_progress is not None:
                    on_progress(cursor.text())
                if step.stream:
                    acks[step.stream] = step.reply
                elif step.reply:
                    _send(sock, b"".join(acks.values()) + step.reply, lost)
                    acks.clear()
                if step.exit_code is not None:
                    return StreamResult(step.exit_code, cursor.run_id, sizes["o"], sizes["e"],
                                        time.monotonic() - started, rx.duplicates, rx.gaps)
            if acks:
                _send(sock, b"".join(acks.values()), lost)


def _send(sock: socket.socket, data: bytes, lost: Callable[[str], str]) -> None:
    try:
        sock.sendall(data)
    except OSError as e:
        raise UnavailableError(lost(f"{e.strerror or e}")) from None


def same_file(a: int, b: int) -> bool:
    """Whether descriptors ``a`` and ``b`` write to the same file (a batch job's merged output file, a
    terminal): then a payload's stdout and stderr should reach it in print order (``merge``)."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
