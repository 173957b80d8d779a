"""A minimal Redis client (RESP2 over one TCP or unix socket) for the hooks' light path.

redis-py costs ~130 ms of imports here, most of a hook's budget; a hook needs a handful of commands
(AUTH, SELECT, LPUSH, BLPOP, HGETALL, SET) on one connection, which this does in stdlib.  Errors become
UnavailableError (cannot reach / talk to Redis) or PermanentError (Redis refused: NOPERM, WRONGPASS).
"""

from __future__ import annotations

import socket
from urllib.parse import unquote, urlsplit

from provisioner.errors import DeadlineExceeded, PermanentError, UnavailableError, ValidationError

Reply = bytes | int | list["Reply"] | None
MAX_BULK = 16 * 1024 * 1024


class RedisReplyError(PermanentError):
    """Redis answered with an error (e.g. NOPERM for a command or key this user may not use)."""


class LightRedis:
    """One connection; not thread-safe (a hook is one thread)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "unix"):
            raise ValidationError(f"redis url {url[:64]!r}: only redis:// and unix:// are supported here")
        self.where = f"{parts.hostname}:{parts.port}" if parts.scheme == "redis" else parts.path
        try:
            if parts.scheme == "unix":
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout_s)
                self.sock.connect(parts.path)
            else:
                self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379),
                                                     timeout=timeout_s)
        except OSError as exc:
            raise UnavailableError(f"redis {self.where}: {exc.strerror or exc}") from None
        self.timeout_s = timeout_s
        self.buf = b""
        if parts.password is not None:
            self.execute("AUTH", unquote(parts.username or "default"), unquote(parts.password))
        db = parts.path.strip("/") if parts.scheme == "redis" else ""
        if db not in ("", "0"):
            self.execute("SELECT", db)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LightRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, *args: str | int, block_s: float = 0.0) -> Reply:
        """Send one command, read its reply; ``block_s`` extends the socket timeout for BLPOP."""
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode() if isinstance(a, str) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        try:
            self.sock.settimeout(self.timeout_s + block_s)
            self.sock.sendall(b"".join(out))
            return self._reply()
        except TimeoutError:
            raise DeadlineExceeded(f"redis {self.where}: no answer in time") from None
        except OSError as exc:
            raise UnavailableError(f"redis {self.where}: {exc.strerror or exc}") from None

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line, self.buf = self.buf[:i], self.buf[i + 2 :]
        return line

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise UnavailableError(f"redis {self.where}: connection closed")
        self.buf += chunk

    def _reply(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisReplyError(f"redis {self.where}: {rest.decode(errors='replace')[:200]}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            if n > MAX_BULK:
                raise UnavailableError(f"redis {self.where}: reply of {n} bytes is too long")
            while len(self.buf) < n + 2:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise UnavailableError(f"redis {self.where}: unexpected reply {line[:40]!r}")

    # The few commands the hooks use, typed.
    def set(self, name: str, value: str, *, nx: bool = False, ex: int | None = None) -> bool:
        args: list[str | int] = ["SET", name, value]
        if nx:
            args.append("NX")
        if ex is not None:
            args += ["EX", ex]
        return self.execute(*args) is not None

    def lpush(self, name: str, value: str) -> int:
        n = self.execute("LPUSH", name, value)
        assert isinstance(n, int)
        return n

    def blpop(self, name: str, timeout_s: float) -> bytes | None:
        got = self.execute("BLPOP", name, f"{max(0.01, timeout_s):.3f}", block_s=timeout_s)
        if isinstance(got, list) and len(got) == 2 and isinstance(got[1], bytes):
            return got[1]
        return None

    def hgetall(self, name: str) -> dict[str, str]:
        got = self.execute("HGETALL", name)
        items = got if isinstance(got, list) else []
        it = iter(x.decode() if isinstance(x, bytes) else str(x) for x in items)
        return dict(zip(it, it, strict=True))
