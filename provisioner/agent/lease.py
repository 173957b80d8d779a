"""The host lease: taken before an agent touches anything, renewed in a thread nothing else can block.

The lease (``lease:host:NAME``, PX TTL, value = the agent's token) is what monitors and placement read as
"this host's agent is alive".  Renewal is a compare-and-set on the token (renew_lease.lua): a renewal
that finds another token is refused; one that finds the lease expired takes it again but reports a
gap.  Either way the agent *learns* it lost its lease (``LeaseKeeper.lost``, ``on_lost``): self-fencing
hooks onto that.  The loop survives every exception (a Sentinel failover raises ReadOnlyError, not one
of ours): it is logged and counted, and the counts reach the host record with the next renewal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from provisioner.errors import ConflictError
from provisioner.state.hosts import LeaseHealth, Renewal

log = logging.getLogger(__name__)
# Extra wait past one TTL for a lease left by a crashed agent: lets a renewal already in flight land.
ACQUIRE_MARGIN_S = 1.0


class LeaseStore(Protocol):
    """The part of the state store the lease needs (StateStore implements it)."""

    def acquire_lease(self, host: str, token: str, ttl_s: float) -> str | None:
        """Take the lease if free; None if ``token`` holds it now, else the holder's token."""

    def renew_lease(
        self, host: str, token: str, ttl_s: float, health: LeaseHealth | None = None
    ) -> tuple[Renewal, str]:
        """Compare-and-set renewal; (outcome, other holder's token when refused)."""

    def add_event(
        self, kind: str, message: str = "", *, host: str | None = None, instance: str | None = None
    ) -> str:
        """Append an event to the event stream."""


def acquire(
    store: LeaseStore,
    host: str,
    token: str,
    ttl_s: float,
    margin_s: float = ACQUIRE_MARGIN_S,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Take the host's lease for ``token``, waiting up to one TTL + margin for a dead agent's lease to
    expire.  Raises ConflictError (exit 4) if another agent keeps renewing it: it is alive, and a second
    agent for one host would reconcile against it (destroying its VMs as orphans)."""
    deadline = time.monotonic() + ttl_s + margin_s
    holder = store.acquire_lease(host, token, ttl_s)
    while holder is not None:
        if time.monotonic() > deadline:
            raise ConflictError(
                f"host {host}: another agent holds its lease (token {holder}) and keeps renewing it;"
                " not starting a second agent for the same host"
            )
        sleep(min(0.1, ttl_s / 10))
        holder = store.acquire_lease(host, token, ttl_s)


@dataclass
class LeaseStats:
    """What the renewal loop has seen (read by other threads; ints and a string, replaced whole)."""

    renewals: int = 0
    failures: int = 0
    refusals: int = 0
    losses: int = 0
    last_error: str = ""
    last_ok: float | None = None  # time.monotonic() of the last successful renewal

    def health(self) -> LeaseHealth:
        return LeaseHealth(self.failures, self.refusals, self.losses, self.last_error)


def _one_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


class LeaseKeeper:
    """Renews one host's lease every third of its TTL until stopped; never dies of an exception."""

    def __init__(
        self,
        store: LeaseStore,
        host: str,
        token: str,
        ttl_s: float,
        on_lost: Callable[[str], None] | None = None,
        on_renewed: Callable[[Renewal], None] | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.token = token
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self.on_lost = on_lost
        self.on_renewed = on_renewed  # after each successful renewal: the watchdog's pet hooks on here
        self.stats = LeaseStats()
        self.lost = threading.Event()  # set when the lease was lost; cleared by whoever handles it
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused = False  # the last renewal was refused (another token holds the lease)

    def renew_once(self) -> Renewal | None:
        """One renewal; the outcome, or None if it raised (counted, logged, never propagated)."""
        try:
            outcome, holder = self.store.renew_lease(self.host, self.token, self.ttl_s, self.stats.health())
        except Exception as err:  # any error (ReadOnlyError, OSError, ours): count, go on
            self.stats.failures += 1
            self.stats.last_error = _one_line(err)
            log.warning("lease %s: renewal failed (%d so far): %s", self.host, self.stats.failures, err)
            return None
        if outcome is Renewal.REFUSED:
            self.stats.refusals += 1
            if not self._refused:  # report once per takeover, not every third of a TTL
                self._refused = True
                self._lost(f"lease held by another agent (token {holder}); renewal refused")
            return outcome
        self._refused = False
        self.stats.renewals += 1
        self.stats.last_ok = time.monotonic()
        if outcome is Renewal.RETAKEN:
            self._lost("lease had expired (a gap without renewal); taken again")
        if self.on_renewed is not None:
            try:
                self.on_renewed(outcome)
            except Exception:  # a broken hook must not stop renewal
                log.exception("lease %s: on_renewed hook failed", self.host)
        return outcome

    def _lost(self, why: str) -> None:
        self.stats.losses += 1
        log.error("lease %s: lost: %s", self.host, why)
        try:
            self.store.add_event("lease_lost", why, host=self.host)
        except Exception as err:  # reporting must not stop renewal
            log.warning("lease %s: cannot record the loss: %s", self.host, err)
        if self.on_lost is not None:
            try:
                self.on_lost(why)
            except Exception:  # a broken hook must not stop renewal
                log.exception("lease %s: on_lost hook failed", self.host)
        self.lost.set()  # last: whoever waits on it sees the loss counted, recorded and handled

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.renew_once()
            except Exception:  # belt and braces: only the stop event ends this loop
                log.exception("lease %s: unexpected error in the renewal loop", self.host)

    def start(self) -> threading.Thread:
        """Renew once now (so the lease is fresh before anything slow), then keep renewing in a thread."""
        self.renew_once()
        self._thread = threading.Thread(target=self.run, name=f"lease-{self.host}", daemon=True)
        self._thread.start()
        return self._thread

    def close(self, timeout_s: float = 5.0) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
