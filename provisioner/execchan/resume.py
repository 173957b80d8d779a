"""A streaming client's cursor file: what a client restarted after it died needs to resume exactly.

The client rewrites ``PATH`` (atomically) before each chunk with ``RUN:NEXT_OUT:NEXT_ERR STREAM SIZE`` (the
chunk about to be written and the size of its file before it) and after it with the new cursor alone.  A
client can die between writing a chunk and saving the new cursor; the guest then sends that chunk again.
When the output goes to a regular file (a batch job's output files, merged or not) the restarted client
drops exactly the bytes of it that already reached the file, so the file holds every byte once.  For a
pipe or a terminal (no size) at most the one chunk in flight at the death may repeat.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable

from provisioner.errors import ValidationError
from provisioner.execchan.frames import Cursor

Sink = Callable[[bytes], object]


def _size(fd: int) -> int | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class CursorFile:
    """Saved twice per chunk: before the chunk is written (with the stream it belongs to, pending) and after
    (with the new cursor).  A restarted client finds either a clean cursor (nothing in flight) or a pending
    chunk and how large its file was before it: the excess is what already got written."""

    def __init__(self, path: str, out_fd: int, err_fd: int) -> None:
        self.path = path
        self.fds = {"o": out_fd, "e": err_fd}
        self.skip = {"o": 0, "e": 0}
        self.text = ""

    def load(self) -> str | None:
        """The saved cursor text (None: no file, a fresh start); sets how much of the chunk that was in
        flight is already in its file."""
        try:
            with open(self.path, encoding="ascii") as f:
                parts = f.read(256).split()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise ValidationError(f"cursor file {self.path}: unreadable ({e})") from None
        try:
            cursor = Cursor.parse(parts[0]) if parts else None
        except ValueError:
            cursor = None
        pending = parts[1:]
        ok = cursor is not None and (
            not pending or (len(pending) == 2 and pending[0] in ("o", "e") and pending[1].isdigit())
        )
        if cursor is None or not ok:
            raise ValidationError(f"cursor file {self.path}: not RUN:NEXT_OUT:NEXT_ERR [o|e SIZE]")
        if pending:
            now = _size(self.fds[pending[0]])
            if now is not None:
                self.skip[pending[0]] = max(0, now - int(pending[1]))
        self.text = cursor.text()
        return self.text

    def wrap(self, stream: str, sink: Sink) -> Sink:
        """``sink`` that records the chunk as pending first, and drops what its file already holds of a
        chunk resent after a restart."""

        def write(data: bytes) -> None:
            n = min(self.skip[stream], len(data))
            if n:
                self.skip[stream] -= n
                data = data[n:]
            if not data:
                return
            size = _size(self.fds[stream])
            if size is not None and self.text:
                self._write(f"{self.text} {stream} {size}")
            sink(data)

        return write

    def save(self, text: str) -> None:
        """After a chunk (the client's on_progress): the new cursor, nothing in flight."""
        self.text = Cursor.parse(text).text()  # validated: only a cursor ever lands in the file
        self._write(self.text)

    def _write(self, line: str) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(line + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        for p in (self.path, f"{self.path}.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
