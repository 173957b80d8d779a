"""``dynvm agent --host NAME``: register the host, renew its lease, reconcile, serve ``host.NAME``."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time

from provisioner.config import Config
from provisioner.errors import DynvmError, NotFoundError
from provisioner.model import Host, HostState
from provisioner.runtime import Runtime, build_runtime, serve

log = logging.getLogger(__name__)


def start_agent_runtime(config: Config, host: str) -> Runtime:
    """Connect, register the host with the capacity libvirt reports, and re-drive unfinished work."""
    from provisioner.agent import tasks
    from provisioner.hypervisor.libvirt_host import LibvirtHost
    from provisioner.messaging import make_app

    hc = config.host(host)
    if hc is None:
        raise NotFoundError(f"host {host!r} is not in the configuration ({config.source})")
    rt = build_runtime(config, host=host)
    rt.hypervisor = LibvirtHost(hc.uri, call_timeout_s=config.timeouts.libvirt_call_s)
    try:
        cap = rt.hypervisor.capacity()
    except DynvmError as err:
        # Unreachable hypervisor: say so where operators and the scheduler look, create nothing.
        if rt.store.get_host(host) is not None:
            rt.store.set_host_state(
                host, HostState.SUSPECT, reason=f"agent cannot reach libvirt: {err}"[:300]
            )
        rt.store.add_event("host_unreachable", host=host, message=str(err)[:300])
        raise
    stored = rt.store.register_host(
        Host(
            name=host,
            uri=hc.uri,
            capacity=cap,
            labels=dict(hc.labels),
            detection_class=hc.detection_class,
            last_seen=time.time(),
        )
    )
    if stored.state is HostState.SUSPECT:  # we reach libvirt again; dead/fenced stay for the operator
        rt.store.set_host_state(host, HostState.UP, reason="agent reached libvirt again")
    rt.lease_token = f"{os.getpid()}-{secrets.token_hex(4)}"
    rt.app = make_app(config)
    tasks.register(rt.app)
    rt.app.dynvm_runtime = rt
    from provisioner.agent.reconcile import reconcile_host

    # Reconcile before the first lease renewal: a host counts as up only once its records match libvirt.
    reconcile_host(rt, startup=True)
    _renew(rt)
    return rt


def _renew(rt: Runtime) -> None:
    assert rt.host is not None
    hc = rt.config.host(rt.host)
    klass = rt.config.detection_classes[hc.detection_class if hc else "standard"]
    rt.store.renew_lease(rt.host, rt.lease_token, klass.lease_ttl_s)


def _background(rt: Runtime, stop: threading.Event) -> None:
    """Lease renewal every third of the TTL; reconciliation every reconcile interval."""
    from provisioner.agent.reconcile import reconcile_host

    assert rt.host is not None
    hc = rt.config.host(rt.host)
    ttl = rt.config.detection_classes[hc.detection_class if hc else "standard"].lease_ttl_s
    next_reconcile = time.monotonic() + rt.config.timeouts.reconcile_interval_s
    while not stop.wait(ttl / 3):
        try:
            _renew(rt)
            if time.monotonic() >= next_reconcile:
                reconcile_host(rt)
                next_reconcile = time.monotonic() + rt.config.timeouts.reconcile_interval_s
        except DynvmError as err:
            log.warning("agent %s: %s", rt.host, err)


def run_agent(config: Config, host: str, concurrency: int = 8) -> None:
    from provisioner.messaging import host_queue

    rt = start_agent_runtime(config, host)
    stop = threading.Event()
    t = threading.Thread(target=_background, args=(rt, stop), name=f"lease-{host}", daemon=True)
    t.start()
    try:
        serve(rt, host_queue(host), f"agent-{host}", concurrency)
    finally:
        stop.set()
        assert rt.hypervisor is not None
        rt.hypervisor.close()
