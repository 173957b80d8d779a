"""A private redis-server for tests and benchmarks: its own loopback port and directory, started and waited
for until it answers, stopped (or SIGKILLed, to test a crash) by its own pid, never by name."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """``redis-server`` on 127.0.0.1:``port`` (a free one by default) in ``directory``.  ``aof``: append-only
    with fsync always (what a crash test needs to find its writes again); ``extra``: more server arguments
    (``--requirepass X`` ...).  ``start()`` may be called again after ``kill()``/``stop()``: same port."""

    def __init__(
        self, directory: Path, *, aof: bool = False, extra: tuple[str, ...] = (), port: int = 0
    ) -> None:
        self.dir, self.aof, self.extra = directory, aof, extra
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (deploy/install.sh installs it)")
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        return [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                *persist, *self.extra]

    def start(self, timeout_s: float = 20.0) -> PrivateRedis:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout_s:g} s")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        """A PING answered (+PONG, or -NOAUTH with a password: up; -LOADING: not yet)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
                return reply[:1] in (b"+", b"-") and not reply.startswith(b"-LOADING")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
