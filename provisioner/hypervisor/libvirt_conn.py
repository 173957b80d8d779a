"""The libvirt connection behind ``LibvirtHost``, and libvirt error translation (STYLE.md 3).

``LibvirtConnection`` owns one connection to one host: opened lazily under a lock, re-opened once when it
drops, kept alive with libvirt keepalive where the driver supports it.  Every call runs in a short-lived
daemon thread and is abandoned after ``call_timeout_s`` (a hung libvirtd must not hang an agent; a daemon
thread, unlike an executor's, cannot block interpreter exit).  ``libvirtError`` never leaves the seam
(this module and ``libvirt_host``, the only modules importing libvirt): it is translated into
HypervisorError (retry may help) or HypervisorPermanentError (it cannot).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from provisioner.errors import DeadlineExceeded, HypervisorError, HypervisorPermanentError

log = logging.getLogger(__name__)
T = TypeVar("T")

KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


class HypervisorTimeout(HypervisorError, DeadlineExceeded):
    """A libvirt call did not return within the call timeout (both a hypervisor and a timeout error)."""


_PERMANENT_CODES = frozenset(
    getattr(libvirt, f"VIR_ERR_{name}")
    for name in (  # noqa: SIM905 (one name per line would double this module)
        "XML_ERROR XML_DETAIL XML_INVALID_SCHEMA INVALID_ARG CONFIG_UNSUPPORTED NO_SUPPORT "
        "ARGUMENT_UNSUPPORTED OPERATION_UNSUPPORTED RESOURCE_BUSY INVALID_MAC NO_OS OS_TYPE NO_KERNEL "
        "NO_SOURCE NO_TARGET DOM_EXIST NO_DOMAIN OPERATION_DENIED ACCESS_DENIED CPU_INCOMPATIBLE"
    ).split()
)
# Disk and lease failures arrive as generic system/internal errors; their text is what identifies them.
_PERMANENT_TEXT = (
    "resource busy",
    "is locked",
    'failed to get "write" lock',
    "cannot access storage file",
    "no such file or directory",
    "already exists with uuid",  # same name, another VM: a name clash, not a passing fault
)
_CONNECTION_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})


def one_line(text: str, limit: int = 300) -> str:
    # libvirt XML errors append the offending XML and a caret line: keep only the first line.
    first = (text or "").strip().splitlines()[0] if (text or "").strip() else "unknown libvirt error"
    first = " ".join(first.split())
    return first if len(first) <= limit else first[: limit - 3] + "..."


def is_connection_error(exc: libvirt.libvirtError) -> bool:
    """Whether the connection itself is gone (so a reconnect may help)."""
    code, domain = exc.get_error_code(), exc.get_error_domain()
    if code in (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC):
        return True
    return domain in _CONNECTION_DOMAINS and code in (
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    )


def is_permanent_error(exc: libvirt.libvirtError) -> bool:
    if is_connection_error(exc):
        return False
    if exc.get_error_code() in _PERMANENT_CODES:
        return True
    text = (exc.get_error_message() or str(exc)).lower()
    return any(t in text for t in _PERMANENT_TEXT)


def translate(exc: libvirt.libvirtError, uri: str, what: str) -> HypervisorError | HypervisorPermanentError:
    msg = f"{uri}: {what}: {one_line(exc.get_error_message() or str(exc))}"
    if is_permanent_error(exc):
        return HypervisorPermanentError(msg)
    return HypervisorError(msg)


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them through exceptions instead."""


class _EventLoop:
    """libvirt's default event loop: process-wide by libvirt's design, so started at most once.

    Keepalive and close callbacks on remote connections only work while this loop runs.
    """

    _lock = threading.Lock()
    _started = False

    @classmethod
    def ensure(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=cls._run, name="libvirt-events", daemon=True).start()
            cls._started = True

    @staticmethod
    def _run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


def is_test_uri(uri: str) -> bool:
    return uri.split(":", 1)[0] == "test"


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:  # a closed connection object raises instead of answering False
        return False


class LibvirtConnection:
    """One lazily opened, reconnecting connection to a libvirt URI, with bounded, translated calls."""

    def __init__(self, uri: str, call_timeout_s: float = 10.0) -> None:
        self.uri = uri
        self.call_timeout_s = call_timeout_s
        self._lock = threading.Lock()
        self._conn: Any | None = None
        self.reconnects = 0  # how many times a dropped connection was re-opened (for tests and status)
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)

    def _connection(self) -> Any:
        if not self._lock.acquire(timeout=self.call_timeout_s):
            raise HypervisorTimeout(f"{self.uri}: connection busy for more than {self.call_timeout_s}s")
        try:
            conn = self._conn
            if conn is not None and _alive(conn):
                return conn
            if conn is not None:
                self.reconnects += 1
            self._conn = self._open()
            return self._conn
        finally:
            self._lock.release()

    def _open(self) -> Any:
        if not is_test_uri(self.uri):
            _EventLoop.ensure()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot connect to libvirt at {self.uri}: {one_line(exc.get_error_message() or str(exc))}"
            ) from None
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
        except libvirt.libvirtError as exc:  # the test driver has no keepalive; nothing to keep alive
            log.debug("%s: keepalive not enabled: %s", self.uri, one_line(str(exc)))
        if not is_test_uri(self.uri):
            try:
                conn.registerCloseCallback(self._on_close, None)
            except libvirt.libvirtError as exc:
                log.debug("%s: no close callback: %s", self.uri, one_line(str(exc)))
        return conn

    def _on_close(self, conn: Any, reason: int, _opaque: object) -> None:
        log.info("%s: connection closed by libvirt (reason %s)", self.uri, reason)
        if self._conn is conn:
            self._conn = None
            self.reconnects += 1

    def _with_reconnect(self, fn: Callable[[Any], T]) -> T:
        conn = self._connection()
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if not is_connection_error(exc):
                raise
            log.info("%s: connection lost (%s); reconnecting once", self.uri, one_line(str(exc)))
            if self._conn is conn:
                self._conn = None
                self.reconnects += 1
        return fn(self._connection())

    def _call(self, what: str, fn: Callable[[Any], T], timeout_s: float | None = None) -> T:
        """Run ``fn(conn)`` in a worker thread; give up after the timeout; translate libvirt errors."""
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        box: list[tuple[bool, Any]] = []
        done = threading.Event()

        def work() -> None:
            try:
                box.append((True, self._with_reconnect(fn)))
            except BaseException as exc:
                box.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=work, name=f"libvirt {self.uri} {what}", daemon=True).start()
        if not done.wait(timeout):
            # The connection may be wedged: the next call opens a fresh one instead of queueing behind it.
            self._conn = None
            raise HypervisorTimeout(f"{self.uri}: {what}: no answer within {timeout:g}s")
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        if isinstance(value, libvirt.libvirtError):
            raise translate(value, self.uri, what) from None
        raise value

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        # close() may block on a dead daemon like any other call: bound it and ignore its errors.
        t = threading.Thread(target=self._quiet_close, args=(conn,), daemon=True)
        t.start()
        t.join(self.call_timeout_s)

    @staticmethod
    def _quiet_close(conn: Any) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
