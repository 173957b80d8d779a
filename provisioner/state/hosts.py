"""Hosts and their leases.

Truth: a host's capacity comes from libvirt (the agent registers it), its state from the store (set by
agents, monitors and operators), its used resources from the claims (provisioner.state.claims).
"""

from __future__ import annotations

from typing import Any, cast

import redis

from provisioner.errors import ConflictError, NotFoundError, ValidationError
from provisioner.model import Host, HostState
from provisioner.state.base import StoreBase, as_str_dict, guarded
from provisioner.state.codec import host_from_fields, host_to_fields
from provisioner.state.events import EventsMixin
from provisioner.state.keys import check_id


class HostsMixin(EventsMixin, StoreBase):
    @guarded
    def register_host(self, host: Host) -> Host:
        """Create or refresh a host (uri, capacity, labels, class); state and claims survive a re-register.

        A new host starts in ``host.state``; every registration bumps the host's epoch.  Returns the
        stored record.
        """
        key = self.keys.host(host.name)
        fields = host_to_fields(host)
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
    def set_host_state(self, name: str, state: HostState, reason: str = "") -> HostState:
        """Set a host's state; returns the previous one.  Raises NotFoundError for an unknown host."""
        previous = self._run("set_host_state", [self.keys.host(name)], [state.value, reason[:500]])
        if previous is None:
            raise NotFoundError(f"host {name!r} is not registered")
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
            pipe.delete(self.keys.host(name), self.keys.claims(name), self.keys.lease(name))
            pipe.srem(self.keys.hosts, name)
            try:
                pipe.execute()
            except redis.exceptions.WatchError:
                raise ConflictError(f"host {name!r} changed while being removed; try again") from None

    @guarded
    def renew_lease(self, host: str, token: str, ttl_s: float) -> None:
        """(Re)take the host's lease for ``ttl_s`` seconds and record last_seen (Redis clock)."""
        check_id(token, "lease token")
        if not ttl_s > 0:
            raise ValidationError(f"lease ttl for host {host}: {ttl_s} must be > 0")
        ok = self._run(
            "renew_lease", [self.keys.host(host), self.keys.lease(host)], [token, max(1, int(ttl_s * 1000))]
        )
        if not ok:
            raise NotFoundError(f"host {host!r} is not registered; cannot renew its lease")

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
