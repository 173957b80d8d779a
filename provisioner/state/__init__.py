"""The Redis state store (hosts, instances, capacity claims, leases, events)."""

from provisioner.state.claims import ClaimRequest, ClaimResult
from provisioner.state.events import Event, NewEvent
from provisioner.state.keys import ID_RE, check_id
from provisioner.state.store import StateStore

__all__ = ["ID_RE", "ClaimRequest", "ClaimResult", "Event", "NewEvent", "StateStore", "check_id"]
