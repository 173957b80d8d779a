"""Redis key names, and the one gate every id passes before it becomes part of a key.

Ids come from jobs and operators; a malformed one (spaces, braces, newlines, glob characters) must never
reach a key, so every key is built here and every id is checked against ID_RE first.
"""

from __future__ import annotations

# The id gate itself lives in provisioner.ids (stdlib + errors only), so the light hook path can use it.
from provisioner.ids import ID_RE as ID_RE
from provisioner.ids import check_id as check_id


class Keys:
    """Key layout under one prefix (default ``dynvm``)."""

    def __init__(self, prefix: str = "dynvm") -> None:
        self.prefix = check_id(prefix, "key prefix")
        p = self.prefix
        self.hosts = f"{p}:hosts"  # set of host names
        self.instances = f"{p}:insts"  # set of every instance id
        self.events = f"{p}:events"  # stream

    def host(self, name: str) -> str:
        return f"{self.prefix}:host:{check_id(name, 'host name')}"

    def claims(self, host: str) -> str:
        """Hash instance id -> "vcpus,memory_mib" of the claims on one host."""
        return f"{self.prefix}:claims:{check_id(host, 'host name')}"

    def vo_members(self, vo: str) -> str:
        """Hash instance id -> "vcpus,refs" of a VO's instances holding a claim (its quota usage)."""
        return f"{self.prefix}:vomembers:{check_id(vo, 'vo')}"

    @property
    def vo_vcpus(self) -> str:
        """Hash VO -> vCPUs of its instances holding a claim."""
        return f"{self.prefix}:vovcpus"

    def anti_affinity(self, host: str) -> str:
        """Hash anti-affinity group -> comma list of its instances holding a claim on the host."""
        return f"{self.prefix}:aa:{check_id(host, 'host name')}"

    def lease(self, host: str) -> str:
        return f"{self.prefix}:lease:host:{check_id(host, 'host name')}"

    def inst(self, iid: str) -> str:
        return f"{self.prefix}:inst:{check_id(iid, 'instance id')}"

    def idem(self, key: str) -> str:
        return f"{self.prefix}:idem:{check_id(key, 'idempotency key')}"

    def by_host(self, host: str) -> str:
        return f"{self.prefix}:idx:host:{check_id(host, 'host name')}"

    def by_state(self, state: str) -> str:
        return f"{self.prefix}:idx:state:{check_id(state, 'state')}"

    def by_role(self, role: str) -> str:
        return f"{self.prefix}:idx:role:{check_id(role, 'role')}"

    def notify(self, iid: str) -> str:
        return f"{self.prefix}:notify:{check_id(iid, 'instance id')}"
