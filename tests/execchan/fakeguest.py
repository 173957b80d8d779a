"""A hand-written guest side of the exec channel on a unix socket (no runner, no busybox), for tests of the
host side (probes, exec_in_vm, the client).  Each connection's first line, ``<TAG> <id> <timeout_s>
<base64 script> [...]``, is recorded as a ``Request`` and handed to ``answer``, which subclasses write as
their tests need.  ``hung``: accept and never answer, as a paused VM's QEMU does (it still accepts).
The real runner under busybox is tests/execchan/guestsim.py."""

from __future__ import annotations

import base64
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True, slots=True)
class Request:
    tag: str  # DYNVM-EXEC (one answer) or DYNVM-RUN (streamed frames)
    id: str
    timeout: int
    script: str


def result_line(req_id: str, code: int, out: bytes = b"", err: bytes = b"") -> bytes:
    """The one-shot protocol's answer: ``DYNVM-RESULT <id> <exit_code> <base64 stdout> <base64 stderr>``."""
    b64 = base64.b64encode
    return f"DYNVM-RESULT {req_id} {code} {b64(out).decode()} {b64(err).decode()}\n".encode()


class FakeGuest:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen()
        self.hung = False
        self.requests: list[Request] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def answer(self, conn: socket.socket, reader: BinaryIO, req: Request) -> None:
        """Reply to ``req`` on ``conn`` (``reader``: the rest of what the client sends)."""
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                reader = conn.makefile("rb")
                line = reader.readline().decode()
                if self.hung or not line:
                    conn.recv(1)  # hold the connection until the client gives up
                    continue
                tag, req_id, tmo, payload, *_ = line.split()
                req = Request(tag, req_id, int(tmo), base64.b64decode(payload).decode())
                self.requests.append(req)
                self.answer(conn, reader, req)
