"""The agent's answers to request/reply calls (inventory): run here, reply through provisioner.rpc.

Job payloads are not among them: they go straight to the guest's exec channel (provisioner.control.execjob),
never through a queue that could redeliver them.
"""

from __future__ import annotations

from provisioner.rpc import reply
from provisioner.runtime import Runtime


def answer_inventory(rt: Runtime, request_id: str) -> None:
    """Agent side: list the domains and publish them."""
    assert rt.hypervisor is not None
    doms = [
        {
            "name": d.name,
            "state": d.state.value,
            "instance_id": d.metadata.get("instance_id"),
            "vo": d.metadata.get("vo"),
            "image": d.metadata.get("image"),
        }
        for d in rt.hypervisor.list_domains()
    ]
    reply(rt, request_id, {"host": rt.host, "domains": doms})
