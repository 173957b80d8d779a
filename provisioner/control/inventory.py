"""Ask a host's agent what libvirt actually runs there (libvirt is the truth for what runs).

Used by ``dynvm host show --inventory``, the reconciler's tests and operators who want libvirt's view
rather than the records'.
"""

from __future__ import annotations

from typing import Any

from provisioner.rpc import call_agent
from provisioner.runtime import Runtime


def host_inventory(rt: Runtime, host: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Client side: the domains libvirt on ``host`` knows, as its agent saw them just now."""
    from provisioner.messaging import INVENTORY

    return list(call_agent(rt, host, INVENTORY, [], timeout_s)["domains"])
