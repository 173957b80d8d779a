"""Self-fencing: what an agent does when it cannot renew its lease (pure; the agent's lease thread acts).

The quorum rule (DESIGN.md): an agent that has lost Redis AND cannot reach a majority of its peers is
isolated, and destroys its HA-managed VMs before its lease can expire, so that by the time the monitor
may restart them elsewhere (lease expiry + a safety margin) the old copies are gone.  An agent that lost
only Redis while a majority of peers answer assumes a control-plane outage and fences nothing (the
monitor, which needs Redis too, cannot fail anything over meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    NONE = "none"  # lease renewed recently
    PAUSE = "pause"  # Redis lost, peers answer: control-plane outage, fence nothing
    FENCE = "fence"  # isolated: destroy HA-managed VMs now


@dataclass(frozen=True, slots=True)
class Isolation:
    since_renewal_s: float  # seconds since the last successful lease renewal (agent's monotonic clock)
    peers_total: int  # other agents configured
    peers_heard: int  # other agents heard from within the peer timeout


def has_quorum(peers_total: int, peers_heard: int) -> bool:
    """A strict majority of the whole cluster (this host included) is reachable from here."""
    return 2 * (peers_heard + 1) > peers_total + 1


def self_fence_action(iso: Isolation, lease_ttl_s: float, fence_margin_s: float) -> Action:
    """FENCE once the lease could be at risk (``lease_ttl_s - fence_margin_s`` without a renewal) and no
    quorum; PAUSE in the same situation with a quorum; NONE while renewals succeed."""
    if iso.since_renewal_s < lease_ttl_s - fence_margin_s:
        return Action.NONE
    if has_quorum(iso.peers_total, iso.peers_heard):
        return Action.PAUSE
    return Action.FENCE


def restart_allowed_after(last_seen: float, lease_ttl_s: float, watchdog_s: float, margin_s: float) -> float:
    """Redis time after which the monitor may treat a silent host's HA VMs as gone: the agent self-fenced
    before its lease ended, or its watchdog fired ``watchdog_s`` after the last pet (which happens at
    each renewal); plus a safety margin for clocks and the kill itself."""
    return last_seen + max(lease_ttl_s, watchdog_s) + margin_s
