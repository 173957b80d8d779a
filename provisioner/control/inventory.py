"""Ask a host's agent what libvirt actually runs there (libvirt is the truth for what runs).

Used by ``dynvm host show --inventory``, the reconciler's tests and operators who want libvirt's view
rather than the records'.
"""

from __future__ import annotations

from typing import Any

from provisioner.control.rpc import call_agent, reply
from provisioner.control.runtime import Runtime


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


def host_inventory(rt: Runtime, host: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Client side: the domains libvirt on ``host`` knows, as its agent saw them just now."""
    from provisioner.control.tasks import INVENTORY

    return list(call_agent(rt, host, INVENTORY, [], timeout_s)["domains"])
