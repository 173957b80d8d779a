"""The real guest runner (images/build/guest/exec-runner.sh) under the real busybox, on this host.

Stands in for QEMU's virtio-serial chardev: the runner's port (fd 3) is one end of a socketpair, and a unix
socket serves one client connection at a time and relays bytes both ways, as QEMU does.  While no client
is connected nothing reads the runner's side, so its writes block (as a guest's port writes do while the
host end is closed).  ``drop_client()`` cuts the current client off, as a client that dies would.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import wait_until

RUNNER = Path(__file__).resolve().parents[2] / "images" / "build" / "guest" / "exec-runner.sh"
BUSYBOX = Path(os.environ.get("DYNVM_BUSYBOX", "/bin/busybox"))


def busybox_bin(dest: Path) -> Path:
    """A PATH directory where every applet is the busybox the test images embed (as in the guest)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
    for name in out.split():
        link = dest / name
        if not link.exists():
            link.symlink_to(BUSYBOX)
    return dest


class GuestSim:
    def __init__(self, tmp: Path, path: Path | None = None) -> None:
        if shutil.which(str(BUSYBOX)) is None and not BUSYBOX.exists():
            raise RuntimeError(f"no busybox at {BUSYBOX}")
        self.state = tmp / "guest"
        self.state.mkdir()
        self.path = path or tmp / "exec.sock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._port, theirs = socket.socketpair()
        env = {"PATH": str(busybox_bin(tmp / "bin")), "DYNVM_EXEC_STATE": str(self.state), "HOME": "/"}
        # The port arrives as stdin and becomes fd 3; a session of its own so close() ends every process
        # the runner started (sender, pumps, jobs) by their group id.
        argv = [str(BUSYBOX), "sh", "-c", 'exec 3<&0 </dev/null; exec sh "$0"', str(RUNNER)]
        self.proc = subprocess.Popen(argv, env=env, stdin=theirs.fileno(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(self.path))
        self._listener.listen()
        self._client: socket.socket | None = None
        self.drop_chunks: set[int] = set()  # indices (from 0) of DYNVM-OUT lines to lose on the way out
        self._chunks_seen = 0
        self._partial = b""
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def ready(self) -> bool:
        return (self.state / "dynvm-exec-ready").exists()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._client = conn
            self._relay(conn)
            with self._lock:
                self._client = None
            conn.close()

    def _relay(self, conn: socket.socket) -> None:
        while True:
            try:
                r, _, _ = select.select([conn, self._port], [], [], 0.5)
            except (OSError, ValueError):
                return
            if self._stop:
                return
            try:
                if conn in r:
                    data = conn.recv(65536)
                    if not data:
                        return
                    self._port.sendall(data)
                if self._port in r:
                    data = self._port.recv(65536)
                    if not data:
                        return
                    conn.sendall(self._lose(data) if self.drop_chunks else data)
            except OSError:
                return

    def _lose(self, data: bytes) -> bytes:
        """Whole lines only; the DYNVM-OUT lines listed in drop_chunks vanish (a lost chunk message)."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        kept = []
        for line in lines:
            if line.startswith(b"DYNVM-OUT "):
                self._chunks_seen += 1
                if self._chunks_seen - 1 in self.drop_chunks:
                    continue
            kept.append(line + b"\n")
        return b"".join(kept)

    def drop_client(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        self._listener.close()
        self.drop_client()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._port.close()


@contextlib.contextmanager
def running_guest(tmp: Path, path: Path | None = None, timeout: float = 30) -> Iterator[GuestSim]:
    """A GuestSim whose runner holds its port (ready for a client); closed on the way out."""
    g = GuestSim(tmp, path)
    try:
        wait_until(g.ready, timeout, what="the runner to hold its port")
        yield g
    finally:
        g.close()
