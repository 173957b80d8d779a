"""``dynvm agent --host NAME``: take the host's lease, register, serve ``host.NAME``; renew and reconcile
in two threads of their own.

Order at start-up: the lease first (a second agent for a live host stops here, before it touches
libvirt or any record), then libvirt and the host record, then lease renewal, and only then the start-up
reconciliation (which may re-drive unfinished boots for minutes) in its own thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable

from ha.watchdog import pet, pet_file
from provisioner.agent.fencing import AgentFencing
from provisioner.agent.handover import forget, own_record, record_path, run_dir, take_over, write_record
from provisioner.agent.lease import LeaseKeeper, acquire
from provisioner.agent.loops import LoopRecord
from provisioner.config import Config
from provisioner.errors import ConflictError, DynvmError, NotFoundError
from provisioner.model import Host, HostState
from provisioner.runtime import Runtime, build_runtime, serve
from provisioner.state.hosts import Renewal

log = logging.getLogger(__name__)
# States the agent itself moves to suspect when it cannot reach libvirt (dead/fenced are the monitor's).
_LIVE_STATES = frozenset({HostState.UP, HostState.DRAINING, HostState.MAINTENANCE})


def lease_ttl_s(config: Config, host: str) -> float:
    hc = config.host(host)
    return config.detection_classes[hc.detection_class if hc else "standard"].lease_ttl_s


def _mark_suspect(rt: Runtime, host: str, err: DynvmError) -> None:
    stored = rt.store.get_host(host)
    if stored is None or stored.state not in _LIVE_STATES:
        return
    with contextlib.suppress(ConflictError):  # someone moved it meanwhile: theirs is newer
        rt.store.set_host_state(
            host, HostState.SUSPECT, expected=stored.state, reason=f"agent cannot reach libvirt: {err}"[:300]
        )


def start_agent_runtime(config: Config, host: str) -> Runtime:
    """Take the lease, connect, register the host with the capacity libvirt reports."""
    hc = config.host(host)
    if hc is None:
        raise NotFoundError(f"host {host!r} is not in the configuration ({config.source})")
    rt = build_runtime(config, host=host)
    rt.lease_token = f"{os.getpid()}-{secrets.token_hex(4)}"
    ttl, record = lease_ttl_s(config, host), record_path(config, host)
    # A restarted agent takes its dead predecessor's lease over at once (no gap); otherwise wait/exit 4.
    if take_over(rt.store, record, host, rt.lease_token, ttl):
        # The lease never lapsed (the dead agent's token still held it): pet the watchdog at once, so
        # that a restart slower than its timeout (libvirt, register, first renewal) kills nothing.
        pet(pet_file(run_dir(config), host))
    else:
        acquire(rt.store, host, rt.lease_token, ttl)
    write_record(record, own_record(host, rt.lease_token))
    # Imported only now (libvirt, Celery: up to seconds on a busy host): the lease comes first.
    from provisioner.agent import tasks
    from provisioner.hypervisor.libvirt_host import LibvirtHost
    from provisioner.messaging import make_app

    try:
        rt.hypervisor = LibvirtHost(hc.uri, call_timeout_s=config.timeouts.libvirt_call_s)
        cap = rt.hypervisor.capacity()
    except DynvmError as err:
        # Unreachable hypervisor: say so where operators and the scheduler look, create nothing.
        _mark_suspect(rt, host, err)
        rt.store.add_event("host_unreachable", host=host, message=str(err)[:300])
        rt.store.drop_lease(host, rt.lease_token)
        forget(record, rt.lease_token)
        raise
    stored = rt.store.register_host(
        Host(name=host, uri=hc.uri, capacity=cap, labels=dict(hc.labels), detection_class=hc.detection_class)
    )
    if stored.state is HostState.SUSPECT:  # we reach libvirt again; dead/fenced stay for the operator
        with contextlib.suppress(ConflictError):
            rt.store.set_host_state(
                host, HostState.UP, expected=HostState.SUSPECT, reason="agent reached libvirt again"
            )
    rt.app = make_app(config)
    tasks.register(rt.app)
    rt.app.dynvm_runtime = rt
    return rt


class ReconcileLoop:
    """Start-up reconciliation (re-driving unfinished boots), then one pass every reconcile interval.

    Its own thread: a re-driven boot may take the full readiness timeout, which must never delay a lease
    renewal.  Survives every exception (logged and counted); a failed start-up pass is retried as one.
    """

    def __init__(self, rt: Runtime) -> None:
        assert rt.host is not None
        self.rt = rt
        self.stop = threading.Event()
        self.passes = 0
        self.failures = 0
        self.last_error = ""
        self.last_run = 0.0  # wall clock of the last pass's end (see provisioner.agent.loops)
        self.record = LoopRecord(rt.store.r, rt.store.keys.prefix, rt.host, "reconcile")
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        from provisioner.agent.reconcile import reconcile_host

        startup = True
        every = self.rt.config.timeouts.reconcile_interval_s
        while not self.stop.is_set():
            try:
                reconcile_host(self.rt, startup=startup)
                startup = False
                self.passes += 1
            except Exception as err:  # any error: count, log, try again next interval
                self.failures += 1
                self.last_error = f"{type(err).__name__}: {err}"[:300]
                log.warning("reconcile %s: pass failed (%d so far): %s", self.rt.host, self.failures, err)
            self.last_run = time.time()
            self.record.write(passes=self.passes, errors=self.failures, last_error=self.last_error,
                              last_run=self.last_run, every_s=every)
            self.stop.wait(every)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"reconcile-{self.rt.host}", daemon=True)
        self._thread.start()


def start_background(
    rt: Runtime,
    on_lease_lost: Callable[[str], None] | None = None,
    on_renewed: Callable[[Renewal], None] | None = None,
) -> tuple[LeaseKeeper, ReconcileLoop]:
    """Lease renewal first (renewed once now), then reconciliation, each in its own thread.

    ``on_lease_lost(why)`` is called (from the lease thread) when the agent learns its lease was lost or
    taken over; ``on_renewed(outcome)`` after each successful renewal (the watchdog's pet)."""
    assert rt.host is not None
    ttl = lease_ttl_s(rt.config, rt.host)
    keeper = LeaseKeeper(rt.store, rt.host, rt.lease_token, ttl, on_lost=on_lease_lost, on_renewed=on_renewed)
    keeper.start()
    loop = ReconcileLoop(rt)
    loop.start()
    return keeper, loop


def run_agent(config: Config, host: str, concurrency: int = 8) -> None:
    from provisioner.messaging import host_queue

    rt = start_agent_runtime(config, host)
    assert rt.hypervisor is not None
    try:  # peers and the watchdog before renewals start petting
        fencing = AgentFencing(config, host, rt.hypervisor, rt.store, lease_ttl_s(config, host))
        fencing.start()
    except DynvmError:
        with contextlib.suppress(DynvmError):
            rt.store.drop_lease(host, rt.lease_token)
        forget(record_path(config, host), rt.lease_token)
        raise
    keeper, loop = start_background(rt, on_renewed=fencing.on_renewed)
    fencing.lease_stats = keeper.stats
    from provisioner.agent.health import HealthLoop

    health = HealthLoop(rt)  # service VMs' health probes; stops hung VMs for the leader's keeper
    health.start()
    try:
        serve(rt, host_queue(host), f"agent-{host}", concurrency)
    finally:
        health.close()
        loop.stop.set()
        fencing.close()  # the watchdog keeps running: a successor pets it, else it fences the HA guests
        keeper.close()
        with contextlib.suppress(DynvmError):  # a clean stop frees the lease for a successor at once
            rt.store.drop_lease(host, rt.lease_token)
        forget(record_path(config, host), rt.lease_token)
        assert rt.hypervisor is not None
        rt.hypervisor.close()
