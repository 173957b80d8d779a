"""Wait until an instance is ready by its image's readiness probe (on the test driver: domain running)."""

from __future__ import annotations

import time

from provisioner.catalogue.model import ProbeType, ResolvedImage
from provisioner.config import DomainType
from provisioner.errors import DeadlineExceeded, NotReadyError
from provisioner.interfaces import DomainState
from provisioner.model import Instance
from provisioner.runtime import Runtime


def wait_ready(rt: Runtime, inst: Instance, image: ResolvedImage) -> None:
    from provisioner.agent.domain import exec_socket_path, serial_log_path

    probe = image.spec.readiness
    wait_domain_running(rt, inst, min(probe.timeout_s, 30.0))
    if rt.config.domain_type is DomainType.TEST or probe.type is ProbeType.DOMAIN_STATE:
        return
    from provisioner.probes import make_probe
    from provisioner.probes import wait_ready as wait_probe

    assert rt.hypervisor is not None
    hv = rt.hypervisor
    runner = make_probe(
        probe,
        domain_state=lambda: hv.state(inst.domain_name),
        serial_log=serial_log_path(rt, inst),
        ip=inst.ip,
        netns=rt.config.network.probe_netns,
        exec_socket=exec_socket_path(rt, inst, rt.host),
    )
    try:
        wait_probe(runner, time.monotonic() + probe.timeout_s, interval=0.05)
    except DeadlineExceeded as err:
        raise NotReadyError(
            f"{inst.id} ({image.ref}) on {rt.host}: not ready after {probe.timeout_s:.0f} s "
            f"({probe.type.value} probe): {err}"
        ) from None


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
