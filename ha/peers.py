"""Agents heartbeat their peers directly over UDP (not through Redis), for the self-fencing quorum rule.

Each agent sends ``dynvm-hb1 HOST SEQ [HMAC]`` to every peer each interval and records when it last
heard each one.  With a shared secret the datagram carries an HMAC-SHA256 so a stray or forged packet
cannot make an isolated host believe it has a quorum.  Both loops survive any error (counted, logged)
and never block the agent: they run in their own daemon threads.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)
MAGIC = b"dynvm-hb1"
MAX_DATAGRAM = 512


def _sign(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).hexdigest().encode()


def encode(host: str, seq: int, secret: bytes | None) -> bytes:
    body = b"%s %s %d" % (MAGIC, host.encode(), seq)
    return body + b" " + _sign(secret, body) if secret else body


def decode(data: bytes, secret: bytes | None) -> str | None:
    """The sender's host name, or None for anything malformed or badly signed."""
    if len(data) > MAX_DATAGRAM:
        return None
    parts = data.split(b" ")
    if len(parts) not in (3, 4) or parts[0] != MAGIC or not parts[2].isdigit():
        return None
    if secret is not None:
        good = len(parts) == 4 and hmac.compare_digest(parts[3], _sign(secret, b" ".join(parts[:3])))
        if not good:
            return None
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


class PeerHeartbeat:
    def __init__(
        self,
        me: str,
        bind: tuple[str, int],
        peers: Mapping[str, tuple[str, int]],
        interval_s: float = 0.2,
        secret: bytes | None = None,
    ) -> None:
        self.me = me
        self.peers = {h: a for h, a in peers.items() if h != me}
        self.interval_s = interval_s
        self.secret = secret
        self.last_heard: dict[str, float] = {}
        self.errors = 0
        self._seq = 0
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(bind)
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"hb-send-{me}", daemon=True),
            threading.Thread(target=self._recv_loop, name=f"hb-recv-{me}", daemon=True),
        ]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=2)
        self._sock.close()

    def heard(self, timeout_s: float, now: float | None = None) -> int:
        """How many peers were heard within ``timeout_s`` (monotonic clock)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return sum(1 for h in self.peers if now - self.last_heard.get(h, -1e18) <= timeout_s)

    def heard_hosts(self, timeout_s: float, now: float | None = None) -> list[str]:
        """The peers heard within ``timeout_s`` (monotonic clock), sorted."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return sorted(h for h in self.peers if now - self.last_heard.get(h, -1e18) <= timeout_s)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._seq += 1
            msg = encode(self.me, self._seq, self.secret)
            for addr in self.peers.values():
                try:
                    self._sock.sendto(msg, addr)
                except OSError as err:  # a peer's network is down: that is what we measure
                    self._count(err)
            self._stop.wait(self.interval_s)

    def _recv_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self._sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError as err:
                if self._stop.is_set():
                    return
                self._count(err)
                continue
            host = decode(data, self.secret)
            if host in self.peers:
                with self._lock:
                    self.last_heard[host] = time.monotonic()

    def _count(self, err: BaseException) -> None:
        self.errors += 1
        if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
            log.warning("peer heartbeat of %s: %s (%d errors so far)", self.me, err, self.errors)
