"""Ask a host's agent what libvirt actually runs there (libvirt is the truth for what runs).

The request goes through the host's queue at HA priority; the agent writes the answer to a short-lived
Redis key and wakes the caller.  Used by ``dynvm host show --inventory``, the reconciler's tests and
operators who want libvirt's view rather than the records'.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from provisioner.control.runtime import Runtime
from provisioner.errors import DeadlineExceeded

REPLY_TTL_S = 60


def _key(rt: Runtime, request_id: str) -> str:
    return f"{rt.store.keys.prefix}:reply:{request_id}"


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
    pipe = rt.store.r.pipeline(transaction=False)
    pipe.rpush(_key(rt, request_id), json.dumps({"host": rt.host, "domains": doms}))
    pipe.expire(_key(rt, request_id), REPLY_TTL_S)
    pipe.execute()


def host_inventory(rt: Runtime, host: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Client side: the domains libvirt on ``host`` knows, as its agent saw them just now."""
    from provisioner.control.app import PRIORITY_HA, host_queue
    from provisioner.control.tasks import INVENTORY

    rt.store.require_host(host)
    request_id = secrets.token_hex(8)
    rt.app.send_task(INVENTORY, args=[request_id], queue=host_queue(host), priority=PRIORITY_HA)
    got = rt.store.r.blpop([_key(rt, request_id)], timeout=timeout_s)
    if got is None:
        raise DeadlineExceeded(
            f"host {host}: its agent did not answer an inventory request in {timeout_s:.0f} s"
        )
    return list(json.loads(got[1])["domains"])
