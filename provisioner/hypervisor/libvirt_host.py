"""``LibvirtHost``: one hypervisor host through libvirt — host queries and domain operations.

The connection it runs them on (lazy, lock-protected, reconnecting, keepalive, every call bounded by a
timeout) and the translation of ``libvirtError`` into HypervisorError / HypervisorPermanentError live in
``libvirt_conn``; together the two modules are dynvm's only libvirt seam (STYLE.md 3).

Note on the test driver: ``test:///abs/host.xml`` gives every open() a fresh copy of the host, so a
reconnect there starts from an empty host; ``test:///default`` is shared per process.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from provisioner.errors import HypervisorPermanentError
from provisioner.hypervisor.domxml import parse_metadata
from provisioner.hypervisor.libvirt_conn import LibvirtConnection, is_test_uri
from provisioner.interfaces import DomainInfo, DomainState
from provisioner.model import Capacity

log = logging.getLogger(__name__)

DEFAULT_MIGRATE_TIMEOUT_S = 300.0

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


class LibvirtHost(LibvirtConnection):
    """One hypervisor host reached through a libvirt URI (implements interfaces.Hypervisor)."""

    def __repr__(self) -> str:
        return f"LibvirtHost({self.uri!r})"

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
        if is_test_uri(self.uri) or is_test_uri(dest.uri):
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
