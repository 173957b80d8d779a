"""The one module of dynvm that imports libvirt (STYLE.md 3: one seam per side effect).

``LibvirtHost`` owns one connection to one host: opened lazily under a lock, re-opened once when it drops,
kept alive with libvirt keepalive where the driver supports it.  Every public call runs in a short-lived
daemon thread and is abandoned after ``call_timeout_s`` (a hung libvirtd must not hang an agent; a daemon
thread, unlike an executor's, cannot block interpreter exit).  ``libvirtError`` never leaves this module:
it is translated into HypervisorError (retry may help) or HypervisorPermanentError (it cannot).

Note on the test driver: ``test:///abs/host.xml`` gives every open() a fresh copy of the host, so a
reconnect there starts from an empty host; ``test:///default`` is shared per process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from provisioner.errors import DeadlineExceeded, HypervisorError, HypervisorPermanentError
from provisioner.hypervisor.domxml import parse_metadata
from provisioner.interfaces import DomainInfo, DomainState
from provisioner.model import Capacity

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MIGRATE_TIMEOUT_S = 300.0
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


class HypervisorTimeout(HypervisorError, DeadlineExceeded):
    """A libvirt call did not return within the call timeout (both a hypervisor and a timeout error)."""


_STATE_MAP = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.OTHER,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.RUNNING,  # shutting down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
}

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


def _one_line(text: str, limit: int = 300) -> str:
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
    msg = f"{uri}: {what}: {_one_line(exc.get_error_message() or str(exc))}"
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


def _is_test_uri(uri: str) -> bool:
    return uri.split(":", 1)[0] == "test"


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:  # a closed connection object raises instead of answering False
        return False


def _lookup(conn: Any, name: str) -> Any | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _xml_name(xml: str, uri: str) -> str:
    try:
        name = ET.fromstring(xml).findtext("name")
    except ET.ParseError as exc:
        raise HypervisorPermanentError(f"{uri}: domain XML does not parse: {exc}") from exc
    if not name:
        raise HypervisorPermanentError(f"{uri}: domain XML has no <name>")
    return name


class LibvirtHost:
    """One hypervisor host reached through a libvirt URI (implements interfaces.Hypervisor)."""

    def __init__(self, uri: str, call_timeout_s: float = 10.0) -> None:
        self.uri = uri
        self.call_timeout_s = call_timeout_s
        self._lock = threading.Lock()
        self._conn: Any | None = None
        self.reconnects = 0  # how many times a dropped connection was re-opened (for tests and status)
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)

    def __repr__(self) -> str:
        return f"LibvirtHost({self.uri!r})"

    # -- connection ---------------------------------------------------------------------------------

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
        if not _is_test_uri(self.uri):
            _EventLoop.ensure()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot connect to libvirt at {self.uri}: {_one_line(exc.get_error_message() or str(exc))}"
            ) from None
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
        except libvirt.libvirtError as exc:  # the test driver has no keepalive; nothing to keep alive
            log.debug("%s: keepalive not enabled: %s", self.uri, _one_line(str(exc)))
        if not _is_test_uri(self.uri):
            try:
                conn.registerCloseCallback(self._on_close, None)
            except libvirt.libvirtError as exc:
                log.debug("%s: no close callback: %s", self.uri, _one_line(str(exc)))
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
            log.info("%s: connection lost (%s); reconnecting once", self.uri, _one_line(str(exc)))
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

    # -- host ---------------------------------------------------------------------------------------

    def capacity(self) -> Capacity:
        info = self._call("get host info", lambda conn: conn.getInfo())
        return Capacity(vcpus=int(info[2]), memory_mib=int(info[1]))

    def hostname(self) -> str:
        return str(self._call("get hostname", lambda conn: conn.getHostname()))

    def host_uuid(self) -> str:
        """The host UUID from the capabilities; for the test driver (it has none) one derived from the URI."""
        caps = self._call("get capabilities", lambda conn: conn.getCapabilities())
        found = ET.fromstring(caps).findtext("host/uuid")
        return found.strip() if found else str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, self.uri))

    # -- domains ------------------------------------------------------------------------------------

    def define_and_start(self, name: str, xml: str) -> None:
        if _xml_name(xml, self.uri) != name:
            raise HypervisorPermanentError(f"{self.uri}: domain XML does not define domain {name!r}")
        self._call(f"define and start domain {name!r}", lambda conn: self._define_and_start(conn, xml))

    @staticmethod
    def _define_and_start(conn: Any, xml: str) -> None:
        name = _xml_name(xml, conn.getURI())
        existing = _lookup(conn, name)
        if existing is not None and existing.isActive():
            return
        dom = conn.defineXML(xml)  # also refreshes the definition of a stopped domain
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and dom.isActive():
                return  # started by someone else meanwhile
            if existing is None:  # leave nothing half-created behind
                try:
                    dom.undefine()
                except libvirt.libvirtError:
                    log.warning("%s: could not undefine %s after a failed start", conn.getURI(), name)
            raise

    def destroy(self, name: str) -> None:
        def op(conn: Any) -> None:
            dom = _lookup(conn, name)
            if dom is None or not dom.isActive():
                return
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise

        self._call(f"destroy domain {name!r}", op)

    def shutdown(self, name: str) -> None:
        def op(conn: Any) -> None:
            dom = _lookup(conn, name)
            if dom is not None and dom.isActive():
                dom.shutdown()

        self._call(f"shut down domain {name!r}", op)

    def undefine(self, name: str) -> None:
        def op(conn: Any) -> None:
            dom = _lookup(conn, name)
            if dom is None:
                return
            flags = (
                libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            )
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError as exc:
                # The test driver rejects the NVRAM flag; plain undefine is all it needs.
                if exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                    raise
                dom.undefine()

        self._call(f"undefine domain {name!r}", op)

    def state(self, name: str) -> DomainState:
        def op(conn: Any) -> DomainState:
            dom = _lookup(conn, name)
            if dom is None:
                return DomainState.MISSING
            return _STATE_MAP.get(dom.state()[0], DomainState.OTHER)

        return self._call(f"get state of domain {name!r}", op)

    def running_names(self) -> set[str]:
        """Names of the domains libvirt reports *running* (one call, however many domains: for pollers)."""
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING
        return self._call("list running domains", lambda conn: {d.name() for d in conn.listAllDomains(flags)})

    def list_domains(self) -> list[DomainInfo]:
        def op(conn: Any) -> list[DomainInfo]:
            out: list[DomainInfo] = []
            for dom in conn.listAllDomains(0):
                try:
                    st = _STATE_MAP.get(dom.state()[0], DomainState.OTHER)
                    xml = dom.XMLDesc(0)
                    out.append(DomainInfo(dom.name(), dom.UUIDString(), st, _safe_metadata(xml)))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # vanished meanwhile
                        raise
            return out

        return self._call("list domains", op)

    def domain_xml(self, name: str) -> str | None:
        """The live domain XML, or None if libvirt does not know the domain."""

        def op(conn: Any) -> str | None:
            dom = _lookup(conn, name)
            return None if dom is None else str(dom.XMLDesc(0))

        return self._call(f"get XML of domain {name!r}", op)

    def serial_log_path(self, name: str) -> str | None:
        """Where the domain's serial console is logged (a <log> file or a file serial), if anywhere."""
        xml = self.domain_xml(name)
        if xml is None:
            return None
        serial = ET.fromstring(xml).find("devices/serial")
        if serial is None:
            return None
        log_el = serial.find("log")
        if log_el is not None and log_el.get("file"):
            return log_el.get("file")
        source = serial.find("source")
        if serial.get("type") == "file" and source is not None:
            return source.get("path")
        return None

    def migrate(
        self,
        name: str,
        dest: LibvirtHost,
        xml: str | None = None,
        migrate_uri: str | None = None,
        live: bool = True,
        timeout_s: float = DEFAULT_MIGRATE_TIMEOUT_S,
        unsafe: bool = False,
    ) -> None:
        """Move a running domain to ``dest`` (persistent there, undefined here).

        ``unsafe``: skip libvirt's shared-storage check; only for storage libvirt cannot recognise as
        shared although it is (the local farm's directory seen by every host)."""
        what = f"migrate domain {name!r} to {dest.uri}"
        if _is_test_uri(self.uri) or _is_test_uri(dest.uri):
            raise HypervisorPermanentError(f"{self.uri}: {what}: the libvirt test driver cannot migrate")
        params: dict[str, Any] = {}
        if xml is not None:
            params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = xml
        if migrate_uri is not None:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri
        flags = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        if live:
            flags |= libvirt.VIR_MIGRATE_LIVE
        if unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE

        def op(conn: Any) -> None:
            dom = _lookup(conn, name)
            if dom is None:
                raise HypervisorPermanentError(f"{self.uri}: {what}: no such domain")
            dom.migrate3(dest._connection(), params, flags)

        self._call(what, op, timeout_s=timeout_s)


def _safe_metadata(xml: str) -> dict[str, str]:
    try:
        return parse_metadata(xml)
    except Exception:  # a foreign domain with odd XML must not break listing
        return {}
