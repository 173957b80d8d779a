"""Extension points: one small Protocol each (STYLE.md, "Contracts first")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from provisioner.model import Capacity


class DomainState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    MISSING = "missing"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class DomainInfo:
    name: str
    uuid: str
    state: DomainState
    metadata: dict[str, str]  # the dynvm metadata element (instance id, role, ...) or {} if foreign


@runtime_checkable
class Hypervisor(Protocol):
    """One libvirt host.  Every call has a timeout and raises only dynvm errors."""

    uri: str

    def capacity(self) -> Capacity:
        """vCPUs, memory and disk the host offers, as libvirt reports them."""

    def define_and_start(self, name: str, xml: str) -> None:
        """Define the domain (persistent) and start it; idempotent if it already runs."""

    def destroy(self, name: str) -> None:
        """Hard-stop the domain; no error if it is already off or missing."""

    def shutdown(self, name: str) -> None:
        """Ask the guest to shut down (ACPI); no error if missing."""

    def undefine(self, name: str) -> None:
        """Remove the definition; no error if missing."""

    def state(self, name: str) -> DomainState:
        """The domain's state; MISSING if libvirt does not know it."""

    def list_domains(self) -> list[DomainInfo]:
        """Every domain the host knows, with dynvm metadata where present."""

    def migrate(self, name: str, dest: Any, xml: str | None = None, migrate_uri: str | None = None,
                live: bool = True, *, unsafe: bool = False) -> None:
        """Live-migrate a running domain to ``dest`` (another Hypervisor of the same kind)."""

    def close(self) -> None:
        """Drop the connection."""


class BatchAdapter(Protocol):
    """A batch system seen from dynvm."""

    name: str

    def pending_by_vo(self) -> dict[str, int]:
        """Pending jobs per VO (for the demand watcher)."""

    def job_exists(self, job_id: str) -> bool:
        """Whether the batch system still knows the job (for the reconciler)."""

    def requeue(self, job_id: str, reason: str) -> None:
        """Put a job whose VM was lost back in the queue."""

    def hold(self, job_id: str, reason: str) -> None:
        """Stop a job from running because of a permanent failure, with a readable reason."""


class ProbeRunner(Protocol):
    def check(self) -> bool:
        """One probe sample: True when the probe passes."""


class FenceAgent(Protocol):
    def fence(self, host: str) -> None:
        """Make sure the host runs nothing; raise if that cannot be confirmed."""
