"""Framing of the streaming exec protocol (pure: no I/O; the guest side is images/build/guest/exec-runner.sh).

A payload's stdout and stderr come back while it runs, as numbered chunks, one line per frame:

    host  -> guest: DYNVM-RUN <id> <timeout_s> <base64 script> [merge]   start (one run at a time; merge:
                                                                  stderr joins stdout, in print order)
                    DYNVM-ACK <id> <o|e> <seq>                    the host holds that stream up to seq
                    DYNVM-ATTACH <id> <next_o> <next_e>           (re)send from these (reconnect, gap)
                    DYNVM-DONE <id>                               the exit arrived: forget the run
    guest -> host : DYNVM-OUT <id> <o|e> <seq> <base64 chunk>     seq from 0 per stream, chunk <= 64 KiB
                    DYNVM-EXIT <id> <exit_code> <n_o> <n_e>       sent after every chunk; n = chunk count
                    DYNVM-BUSY <id> <running id>                  another run still runs
                    DYNVM-NORUN <id>                              nothing known about that run
                    DYNVM-LOST <id> <o|e> <seq>                   that chunk was dropped (acknowledged)

Loss and duplication are designed for: a chunk is delivered only in sequence, a duplicate (a resend after
a reconnect) is dropped, a gap asks for a resend from the first missing chunk, and the exit is accepted only
once every chunk it counts has arrived.  The guest keeps at most a window of unacknowledged chunks per
stream and blocks the payload's pipe when the window is full (backpressure), so nothing grows anywhere, and
it keeps them until acknowledged, so a client that dies and comes back resumes with ATTACH from its
cursor: no gap, no duplicate.  Acknowledge a chunk only after it was written where it belongs.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

RUN_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
STREAMS = ("o", "e")
CHUNK_MAX = 64 * 1024  # the guest's CHUNK
# The longest line either side sends: a full chunk in base64 plus its header (the script line is bounded
# by client.MAX_SCRIPT_BYTES and goes the other way).
MAX_LINE = (CHUNK_MAX + 2) // 3 * 4 + 256
RESEND_AFTER_S = 5.0  # ask again for a missing chunk when the resend asked for has not come by then
_SEQ_MAX = 1 << 62


class ProtocolError(Exception):
    """The run cannot go on (the guest runs another one, forgot this one, or dropped a needed chunk)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "busy", "norun" or "lost"


@dataclass(frozen=True, slots=True)
class Chunk:
    stream: str  # "o" stdout, "e" stderr
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Exit:
    code: int
    n_out: int
    n_err: int


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: str  # "busy", "norun", "lost"
    stream: str = ""
    seq: int = -1
    other: str = ""


Frame = Chunk | Exit | Refusal


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r:.40} is malformed (expected {RUN_ID_RE.pattern})")
    return run_id


def _seq(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _SEQ_MAX:
        raise ValueError(f"sequence number {value!r:.40} out of range")
    return value


def run_line(run_id: str, timeout_s: int, script: bytes, merge: bool = False) -> bytes:
    """``merge``: the guest gives the job one descriptor for stdout and stderr (as a batch system does when
    both go to one file), so that file gets them in print order; everything comes on stream o."""
    tail = b" merge\n" if merge else b"\n"
    head = b"DYNVM-RUN %s %d " % (check_run_id(run_id).encode(), timeout_s)
    return head + base64.b64encode(script) + tail


def ack_line(run_id: str, stream: str, seq: int) -> bytes:
    if stream not in STREAMS:
        raise ValueError(f"stream {stream!r:.8} is not o or e")
    return f"DYNVM-ACK {check_run_id(run_id)} {stream} {_seq(seq)}\n".encode()


def attach_line(run_id: str, next_out: int, next_err: int) -> bytes:
    return f"DYNVM-ATTACH {check_run_id(run_id)} {_seq(next_out)} {_seq(next_err)}\n".encode()


def done_line(run_id: str) -> bytes:
    return f"DYNVM-DONE {check_run_id(run_id)}\n".encode()


def chunk_line(run_id: str, stream: str, seq: int, data: bytes) -> bytes:
    """What the guest sends for one chunk (used by tests and fake guests)."""
    if stream not in STREAMS:
        raise ValueError(f"stream {stream!r:.8} is not o or e")
    return b"DYNVM-OUT %s %s %d %s\n" % (check_run_id(run_id).encode(), stream.encode(), _seq(seq),
                                          base64.b64encode(data))


def exit_line(run_id: str, code: int, n_out: int, n_err: int) -> bytes:
    return f"DYNVM-EXIT {check_run_id(run_id)} {code} {_seq(n_out)} {_seq(n_err)}\n".encode()


def _int(text: bytes) -> int | None:
    if not text.isdigit() or len(text) > 18:
        return None
    return int(text)


def parse_line(line: bytes, run_id: str) -> Frame | None:
    """The frame on one line (without its newline) if it is a well-formed frame of ``run_id``; None for
    anything else (another run's frames, the tail of a frame cut by a reconnect, garbage)."""
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) < 2 or parts[1] != run_id.encode():
        return None
    tag = parts[0]
    if tag == b"DYNVM-NORUN" and len(parts) == 2:
        return Refusal("norun")
    if tag == b"DYNVM-OUT" and len(parts) == 5 and parts[2] in (b"o", b"e"):
        seq = _int(parts[3])
        if seq is None:
            return None
        try:
            data = base64.b64decode(parts[4], validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(data) > CHUNK_MAX:
            return None
        return Chunk(parts[2].decode(), seq, data)
    if tag == b"DYNVM-EXIT" and len(parts) == 5:
        code, n_out, n_err = _int(parts[2]), _int(parts[3]), _int(parts[4])
        if code is None or n_out is None or n_err is None:
            return None
        return Exit(code, n_out, n_err)
    if tag == b"DYNVM-BUSY" and len(parts) == 3 and RUN_ID_RE.fullmatch(parts[2].decode("ascii", "replace")):
        return Refusal("busy", other=parts[2].decode())
    if tag == b"DYNVM-LOST" and len(parts) == 4 and parts[2] in (b"o", b"e"):
        seq = _int(parts[3])
        return None if seq is None else Refusal("lost", stream=parts[2].decode(), seq=seq)
    return None


class LineSplitter:
    """Bytes in, complete lines out; a line longer than MAX_LINE is dropped (up to its newline) instead of
    growing the buffer: memory stays bounded whatever the channel carries."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping = False
        self.dropped = 0  # over-long lines thrown away

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._buf += data[start:nl]
                if len(self._buf) <= self.max_line:
                    lines.append(bytes(self._buf))
                else:
                    self.dropped += 1
            self._buf.clear()
            start = nl + 1
        if not self._skipping:
            self._buf += data[start:]
            if len(self._buf) > self.max_line:
                self._buf.clear()
                self._skipping = True
                self.dropped += 1
        return lines


@dataclass
class Cursor:
    """Where a client stands in a run: the next chunk it expects on each stream (all before are written)."""

    run_id: str
    next_out: int = 0
    next_err: int = 0

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        _seq(self.next_out)
        _seq(self.next_err)

    def text(self) -> str:
        return f"{self.run_id}:{self.next_out}:{self.next_err}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """``RUN:NEXT_OUT:NEXT_ERR`` (``RUN`` alone: from the start)."""
        parts = text.split(":")
        if len(parts) == 1:
            parts += ["0", "0"]
        if len(parts) != 3 or not all(p.isdigit() and len(p) <= 18 for p in parts[1:]):
            raise ValueError(f"cursor {text!r:.60} is not RUN:NEXT_OUT:NEXT_ERR")
        return cls(parts[0], int(parts[1]), int(parts[2]))


@dataclass(frozen=True, slots=True)
class Step:
    """What to do with one received frame, in this order: write ``data`` to ``stream``, send ``reply``,
    and if ``exit_code`` is set the run is over."""

    stream: str = ""
    data: bytes = b""
    reply: bytes = b""
    exit_code: int | None = None


class Receiver:
    """The client's sequence state machine for one run."""

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor
        self._asked: tuple[int, int] | None = None
        self._asked_at = 0.0
        self.duplicates = 0
        self.gaps = 0

    def _next(self, stream: str) -> int:
        return self.cursor.next_out if stream == "o" else self.cursor.next_err

    def _resend(self, now: float) -> bytes:
        """ATTACH from the cursor, unless exactly that was asked for recently (its resend is on the way)."""
        pos = (self.cursor.next_out, self.cursor.next_err)
        if self._asked == pos and now - self._asked_at < RESEND_AFTER_S:
            return b""
        self._asked, self._asked_at = pos, now
        return attach_line(self.cursor.run_id, *pos)

    def feed(self, frame: Frame, now: float) -> Step:
        c = self.cursor
        if isinstance(frame, Chunk):
            expected = self._next(frame.stream)
            if frame.seq < expected:
                self.duplicates += 1
                return Step()
            if frame.seq > expected:
                self.gaps += 1
                return Step(reply=self._resend(now))
            if frame.stream == "o":
                c.next_out += 1
            else:
                c.next_err += 1
            return Step(frame.stream, frame.data, ack_line(c.run_id, frame.stream, frame.seq))
        if isinstance(frame, Exit):
            if (c.next_out, c.next_err) == (frame.n_out, frame.n_err):
                return Step(reply=done_line(c.run_id), exit_code=frame.code)
            if c.next_out > frame.n_out or c.next_err > frame.n_err:
                raise ProtocolError("lost", f"run {c.run_id}: the exit counts {frame.n_out}/{frame.n_err} "
                                    f"chunks but {c.next_out}/{c.next_err} arrived")
            self.gaps += 1
            return Step(reply=self._resend(now))
        if frame.kind == "busy":
            raise ProtocolError("busy", f"the guest is still running another command (run {frame.other})")
        if frame.kind == "norun":
            raise ProtocolError("norun", f"the guest knows no run {c.run_id} (collected already, or "
                                "the guest restarted)")
        if frame.seq < self._next(frame.stream):
            return Step()  # a chunk we already hold
        what = "stdout" if frame.stream == "o" else "stderr"
        raise ProtocolError("lost", f"run {c.run_id}: {what} chunk {frame.seq} is no longer in the guest "
                            "(acknowledged by an earlier client)")
