"""The agent's answers to request/reply calls (inventory): run here, reply through provisioner.rpc.

Job payloads are not among them: they go straight to the guest's exec channel (provisioner.control.execjob),
never through a queue that could redeliver them.
"""

from __future__ import annotations

from typing import Any

from provisioner.rpc import serve_request
from provisioner.runtime import Runtime


def answer_inventory(rt: Runtime, request_id: str, *args: Any) -> None:
    """Agent side: list the domains and publish them (an expired request is dropped, see rpc)."""
    serve_request(rt, request_id, "inventory", _inventory, rt, *args)


def _inventory(rt: Runtime) -> dict[str, Any]:
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
    return {"host": rt.host, "domains": doms}
