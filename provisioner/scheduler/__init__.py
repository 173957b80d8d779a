"""The one scheduler: a pure function from requests and a snapshot to a placement plan (no I/O)."""

from provisioner.scheduler.core import explain, order_requests, schedule
from provisioner.scheduler.index import HostIndex
from provisioner.scheduler.types import (
    Explanation,
    FilterOutcome,
    PlacementRequest,
    Plan,
    SchedulerPolicy,
    Snapshot,
    VOQuota,
)

__all__ = [
    "Explanation",
    "FilterOutcome",
    "HostIndex",
    "PlacementRequest",
    "Plan",
    "SchedulerPolicy",
    "Snapshot",
    "VOQuota",
    "explain",
    "order_requests",
    "schedule",
]
