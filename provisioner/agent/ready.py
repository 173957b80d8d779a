"""Wait until an instance is ready by its image's readiness probe (on the test driver: domain running)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from provisioner.catalogue.model import ProbeType, ResolvedImage
from provisioner.config import DomainType
from provisioner.errors import DeadlineExceeded, DynvmError, HypervisorError, NotReadyError, printable
from provisioner.interfaces import DomainState
from provisioner.model import Instance
from provisioner.runtime import Runtime

if TYPE_CHECKING:
    from provisioner.probes import ProbeRunner


def wait_ready(rt: Runtime, inst: Instance, image: ResolvedImage) -> None:
    from provisioner.agent.domain import exec_socket_path, serial_log_path

    probe = image.spec.readiness
    wait_domain_running(rt, inst, min(probe.timeout_s, 30.0))
    if rt.config.domain_type is DomainType.TEST or probe.type is ProbeType.DOMAIN_STATE:
        return
    from provisioner.probes import GuestGaveUp, make_probe
    from provisioner.probes import wait_ready as wait_probe

    assert rt.hypervisor is not None
    hv = rt.hypervisor
    log_path = serial_log_path(rt, inst)
    runner = make_probe(
        probe,
        domain_state=lambda: hv.state(inst.domain_name),
        serial_log=log_path,
        ip=inst.ip,
        netns=rt.config.network.probe_netns,
        exec_socket=exec_socket_path(rt, inst, rt.host),
    )
    watched = StopsWhenDomainStops(runner, lambda: hv.state(inst.domain_name))
    try:
        wait_probe(watched, time.monotonic() + probe.timeout_s, interval=0.05)
    except DeadlineExceeded as err:
        raise NotReadyError(
            f"{inst.id} ({image.ref}) on {rt.host}: not ready after {probe.timeout_s:.0f} s "
            f"({probe.type.value} probe): {err}{console_tail(log_path)}"
        ) from None
    except GuestGaveUp as err:  # the image's fail_marker: the guest itself says it will not get ready
        raise NotReadyError(
            f"{inst.id} ({image.ref}) on {rt.host}: not ready ({probe.type.value} probe): {err}"
        ) from None
    except DomainStopped as err:
        # Not the image's fault as far as anyone can tell (a fence, an operator, the OOM killer): a
        # transient error, so the boot is retried and the image's circuit breaker does not count it.
        raise HypervisorError(
            f"{inst.id} ({image.ref}) on {rt.host}: {err}{console_tail(log_path)}"
        ) from None


class DomainStopped(Exception):
    """The guest's domain stopped while its readiness was awaited: it cannot become ready any more."""


class StopsWhenDomainStops:
    """A readiness probe that also looks at the domain every ``every_s``: a guest that was destroyed or
    shut off while booting (a fence, an operator's destroy, a crash) fails its boot at once instead of at
    the readiness deadline (minutes for a TCG service guest)."""

    GONE = frozenset({DomainState.SHUTOFF, DomainState.CRASHED, DomainState.MISSING})

    def __init__(self, probe: ProbeRunner, state: Callable[[], DomainState], every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.probe, self.state, self.every_s, self.clock = probe, state, every_s, clock
        self.what = probe.what
        self.started = clock()
        self._next = self.started + every_s

    def check(self) -> bool:
        if self.probe.check():
            return True
        now = self.clock()
        if now >= self._next:
            self._next = now + self.every_s
            try:
                st = self.state()
            except DynvmError:  # libvirt busy or restarting: the probe goes on, the next look decides
                return False
            if st in self.GONE:
                raise DomainStopped(f"domain {st.value} {now - self.started:.1f} s into the readiness wait")
        return False


def console_tail(path: Path, limit: int = 160) -> str:
    """``; console: <its last line>`` from a guest's serial log, or "" (no log, nothing printed).  The
    text is the guest's, so only printable ASCII is kept, and at most ``limit`` characters of it."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            data = f.read()
    except OSError:
        return ""
    lines = [ln for ln in data.decode("ascii", "replace").splitlines() if ln.strip()]
    if not lines:
        return ""
    return f"; console: {printable(lines[-1].strip(), limit)}"


def domain_running(rt: Runtime, inst: Instance) -> bool:
    assert rt.hypervisor is not None
    return rt.hypervisor.state(inst.domain_name) is DomainState.RUNNING


def wait_domain_running(rt: Runtime, inst: Instance, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while not domain_running(rt, inst):
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{inst.id} on {rt.host}: domain not running after {timeout_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
