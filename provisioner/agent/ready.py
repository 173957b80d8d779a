"""Wait until an instance is ready by its image's readiness probe (on the test driver: domain running)."""

from __future__ import annotations

from provisioner.catalogue.model import ProbeType, ResolvedImage
from provisioner.config import DomainType
from provisioner.control.runtime import Runtime
from provisioner.model import Instance


def wait_ready(rt: Runtime, inst: Instance, image: ResolvedImage) -> None:
    from provisioner.agent.lifecycle import wait_domain_running

    probe = image.spec.readiness
    wait_domain_running(rt, inst, min(probe.timeout_s, 30.0))
    if rt.config.domain_type is DomainType.TEST or probe.type is ProbeType.DOMAIN_STATE:
        return
    from provisioner.agent.domain import instance_dir
    from provisioner.probes import wait_probe

    wait_probe(probe, instance_dir=instance_dir(rt, inst), host=rt.host or "", ip=inst.ip,
               netns=rt.extra.get("netns"), timeout_s=probe.timeout_s)
