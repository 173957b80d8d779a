"""Hosts and their leases.

Truth: a host's capacity comes from libvirt (the agent registers it), its state from the store (set by
agents, monitors and operators), its used resources from the claims (provisioner.state.claims).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import redis

from provisioner.errors import ConflictError, InvalidTransition, NotFoundError, ValidationError
from provisioner.model import (
    HOST_TRANSITIONS,
    OPERATOR_HOST_TRANSITIONS,
    WATCHED_HOST_STATES,
    Host,
    HostState,
)
from provisioner.state.base import StoreBase, as_str_dict, guarded
from provisioner.state.codec import host_from_fields, host_to_fields
from provisioner.state.events import EventsMixin
from provisioner.state.keys import check_id


def _allowed(operator: bool) -> str:
    """The transition table as the set_host_state script reads it: "from>to,..."."""
    moves = {(a, b) for a, tos in HOST_TRANSITIONS.items() for b in tos}
    if operator:
        moves |= {(a, b) for a, tos in OPERATOR_HOST_TRANSITIONS.items() for b in tos}
    return ",".join(sorted(f"{a.value}>{b.value}" for a, b in moves))


_ALLOWED = {False: _allowed(False), True: _allowed(True)}
_WATCHED = ",".join(sorted(s.value for s in WATCHED_HOST_STATES))  # moves into these stamp watched_since


class Renewal(StrEnum):
    """What a lease renewal found."""

    RENEWED = "renewed"  # the token held the lease: extended
    RETAKEN = "retaken"  # the lease had expired: taken again, but there was a gap (the lease was lost)
    REFUSED = "refused"  # another token holds the lease: nothing written


@dataclass(frozen=True, slots=True)
class LeaseHealth:
    """An agent's renewal record, kept on the host record (written with each successful renewal)."""

    failures: int = 0  # renewals that raised (Redis unreachable, read-only replica, anything)
    refusals: int = 0  # renewals refused because another token held the lease
    losses: int = 0  # times the agent learnt its lease had been lost (expired or taken)
    last_error: str = ""



class HostsMixin(EventsMixin, StoreBase):
    @guarded
    def register_host(self, host: Host) -> Host:
        """Create or refresh a host (uri, capacity, labels, class); state and claims survive a re-register.

        A new host starts in ``host.state``; every registration bumps the host's epoch.  Returns the
        stored record.
        """
        key = self.keys.host(host.name)
        fields = host_to_fields(host)
        fields.pop("last_seen", None)  # the script takes it from Redis's clock, never the agent's
        args: list[Any] = [host.name, host.state.value]
        for k, v in fields.items():
            args += [k, v]
        epoch, new = cast(list[int], self._run("register_host", [key], args))
        self.add_event(
            "host_registered" if new else "host_reregistered",
            f"{host.capacity.vcpus} vCPU, {host.capacity.memory_mib} MiB, epoch {epoch}",
            host=host.name,
        )
        stored = self.get_host(host.name)
        assert stored is not None  # just written
        return stored

    @guarded
    def get_host(self, name: str) -> Host | None:
        raw = as_str_dict(self.r.hgetall(self.keys.host(name)))
        return host_from_fields(raw) if raw else None

    def require_host(self, name: str) -> Host:
        host = self.get_host(name)
        if host is None:
            raise NotFoundError(f"host {name!r} is not registered")
        return host

    @guarded
    def list_hosts(self) -> list[Host]:
        names = sorted(cast(set[str], self.r.smembers(self.keys.hosts)))
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(self.keys.host(n))
        return [host_from_fields(raw) for raw in pipe.execute() if raw]

    @guarded
    def host_reason(self, name: str) -> str:
        """Why the host is in its state (the reason given to set_host_state)."""
        return str(self.r.hget(self.keys.host(name), "state_reason") or "")

    @guarded
    def set_host_state(
        self,
        name: str,
        state: HostState,
        *,
        expected: HostState,
        reason: str = "",
        operator: bool = False,
        fence: int | None = None,
    ) -> HostState:
        """Compare-and-set a host's state: only from ``expected`` (what the writer read), only along
        HOST_TRANSITIONS (plus OPERATOR_HOST_TRANSITIONS with ``operator``).  Returns the previous state.
        With ``fence`` (the leader monitor's fencing token) the write is applied only while that token
        leads, in the same atomic step.  A move into WATCHED_HOST_STATES from outside them stamps the
        host's ``watched_since`` (Redis's clock) in that step too.

        Raises NotFoundError (unknown host), ConflictError (the state is no longer ``expected``, or the
        fence no longer leads) or InvalidTransition (the table forbids the move: dead/fenced are left only
        by an operator).
        """
        keys = [self.keys.host(name)]
        args: list[Any] = [state.value, expected.value, reason[:500], _ALLOWED[operator], _WATCHED]
        if fence is not None:
            keys.append(f"{self.keys.prefix}:ha:leader")
            args.append(str(fence))
        got = self._run("set_host_state", keys, args)
        if got is None:
            raise NotFoundError(f"host {name!r} is not registered")
        status, previous = str(got[0]), str(got[1])
        if status == "fenced":
            raise ConflictError(f"host {name}: fence {fence} no longer leads; {state.value} not applied")
        if status == "stale":
            raise ConflictError(
                f"host {name} is {previous}, not {expected.value} as read: {state.value} not applied"
            )
        if status == "forbidden":
            who = "" if operator else " (dead/fenced hosts are brought back by an operator: host rejoin)"
            raise InvalidTransition(f"host {name} cannot go from {previous} to {state.value}{who}")
        if previous != state.value:
            self.add_event("host_state", f"{previous} -> {state.value}: {reason}".rstrip(": "), host=name)
        return HostState(previous)

    @guarded
    def remove_host(self, name: str, if_idle: bool = False) -> None:
        """Forget a host (operator action); its claims and lease go with it.

        ``if_idle``: only while it holds no claim and no live instance record (ConflictError naming them
        otherwise); checked under WATCH, so a placement committed meanwhile makes the removal fail.
        """
        with self.r.pipeline(transaction=True) as pipe:
            if if_idle:
                pipe.watch(self.keys.claims(name), self.keys.by_host(name))  # type: ignore[no-untyped-call]
                held = set(cast(dict[str, str], pipe.hgetall(self.keys.claims(name))))
                for iid in cast(set[str], pipe.smembers(self.keys.by_host(name))):
                    if pipe.hget(self.keys.inst(iid), "state") not in (None, "gone", "failed", "lost"):
                        held.add(iid)
                if held:
                    shown = ", ".join(sorted(held)[:5]) + (", ..." if len(held) > 5 else "")
                    raise ConflictError(f"host {name!r} holds {len(held)} VM(s): {shown}")
                pipe.multi()
            # Claims go through the claim script, which keeps the VO quota and anti-affinity books with them.
            self._scripts["release_claim"](keys=[], args=[self.keys.prefix, name, ""], client=pipe)
            pipe.delete(self.keys.host(name), self.keys.claims(name), self.keys.lease(name))
            pipe.srem(self.keys.hosts, name)
            try:
                pipe.execute()
            except redis.exceptions.WatchError:
                raise ConflictError(f"host {name!r} changed while being removed; try again") from None

    @guarded
    def acquire_lease(self, host: str, token: str, ttl_s: float) -> str | None:
        """Take the host's lease for ``token`` if nobody holds it (SET NX PX); of the host's record it only
        stamps ``last_seen`` (Redis's clock) once the lease is the token's.

        Returns None when ``token`` holds the lease now, else the token of the agent holding it.
        """
        check_id(host, "host name")
        check_id(token, "lease token")
        keys = [self.keys.lease(host), self.keys.host(host)]
        holder = self._run("acquire_lease", keys, [token, _ttl_ms(host, ttl_s)])
        return str(holder) if holder else None

    @guarded
    def handover_lease(self, host: str, old_token: str, token: str, ttl_s: float) -> str | None:
        """Give the lease held by ``old_token`` (a dead agent of this host, proven dead by the caller) to
        ``token`` in one compare-and-set, so a restarted agent does not wait for it to expire.

        Returns None when ``token`` holds the lease now, else the token of the agent holding it.
        """
        check_id(host, "host name")
        check_id(old_token, "lease token")
        check_id(token, "lease token")
        script = self._scripts.get("handover_lease")
        if script is None:  # registered on first use (the shared script table lives in base.py)
            from provisioner.state.base import _script_source

            source = _script_source("handover_lease")
            script = self._scripts["handover_lease"] = self.r.register_script(source)
        args: list[str | int] = [self.keys.prefix, old_token, token, _ttl_ms(host, ttl_s)]
        holder = script(keys=[self.keys.lease(host), self.keys.host(host)], args=args)
        return str(holder) if holder else None

    @guarded
    def report_peers(self, host: str, heard: list[str], ttl_s: float) -> None:
        """What ``host``'s agent hears of its peers over UDP (not through Redis), kept ``ttl_s``: lets a
        monitor tell a host cut off from Redis only (its peers still hear it) from a dead one."""
        key = f"{self.keys.prefix}:peers:{check_id(host, 'host name')}"
        self.r.set(key, ",".join(check_id(h, "host name") for h in heard), px=_ttl_ms(host, ttl_s))

    @guarded
    def peer_reports(self, hosts: list[str]) -> dict[str, list[str]]:
        """{reporting host: peers it heard} for the reports still alive."""
        keys = [f"{self.keys.prefix}:peers:{check_id(h, 'host name')}" for h in hosts]
        values = cast(list[str | None], self.r.mget(keys)) if keys else []
        pairs = zip(hosts, values, strict=True)
        return {h: [p for p in v.split(",") if p] for h, v in pairs if v is not None}

    @guarded
    def renew_lease(
        self, host: str, token: str, ttl_s: float, health: LeaseHealth | None = None
    ) -> tuple[Renewal, str]:
        """Extend the host's lease if ``token`` holds it, or take it again if it expired (a gap: the
        caller lost its lease meanwhile); record last_seen (Redis clock) and ``health`` on the host.

        Returns (outcome, holder): holder is the other agent's token when REFUSED, else "".
        Raises NotFoundError for an unregistered host (nothing written).
        """
        check_id(token, "lease token")
        h = health or LeaseHealth()
        got = self._run(
            "renew_lease",
            [self.keys.host(host), self.keys.lease(host)],
            [token, _ttl_ms(host, ttl_s), h.failures, h.refusals, h.losses, h.last_error[:300]],
        )
        status, holder = str(got[0]), str(got[1])
        if status == "unknown":
            raise NotFoundError(f"host {host!r} is not registered; cannot renew its lease")
        return Renewal(status), holder

    @guarded
    def lease_health(self, host: str) -> LeaseHealth:
        """The renewal record the host's agent left with its last successful renewal."""
        raw = cast(
            list[str | None],
            self.r.hmget(
                self.keys.host(host), ["lease_failures", "lease_refusals", "lease_losses", "lease_last_error"]
            ),
        )
        return LeaseHealth(int(raw[0] or 0), int(raw[1] or 0), int(raw[2] or 0), raw[3] or "")

    @guarded
    def lease_alive(self, host: str) -> bool:
        return bool(self.r.exists(self.keys.lease(host)))

    @guarded
    def lease_holder(self, host: str) -> str | None:
        """The token of the agent holding the lease, or None."""
        value = self.r.get(self.keys.lease(host))
        return str(value) if value is not None else None

    @guarded
    def lease_ttl_ms(self, host: str) -> int:
        """Milliseconds left on the lease (<= 0 when there is none)."""
        return int(self.r.pttl(self.keys.lease(host)))

    @guarded
    def drop_lease(self, host: str, token: str | None = None) -> bool:
        """Release the lease (a clean agent shutdown); with ``token``, only if that agent holds it."""
        key = self.keys.lease(host)
        if token is None:
            return bool(self.r.delete(key))
        return bool(self._run("drop_lease", [key], [token]))


def _ttl_ms(host: str, ttl_s: float) -> int:
    if not ttl_s > 0:
        raise ValidationError(f"lease ttl for host {host}: {ttl_s} must be > 0")
    return max(1, int(ttl_s * 1000))
