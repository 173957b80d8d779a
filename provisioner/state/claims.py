"""Capacity claims: the one place that decides whether a host still has room, atomically in Redis.

A claim is ``dynvm:claims:HOST`` field INSTANCE = "vcpus,memory_mib,vo,group"; the host hash keeps
``used_vcpus``/``used_memory_mib`` equal to the sum of its claims, and next to them Redis keeps each VO's
usage (instances and vCPUs holding a claim) and each host's anti-affinity members (see lib.lua).  All of it
changes only inside Lua scripts, which check in the same step that the host is up with a live agent lease,
that ``used + request <= floor(capacity * overcommit)``, that no other member of the claim's anti-affinity
group is on the host and that the VO stays within its quota.  So any number of concurrent control workers
can never overbook a host, overrun a quota or put two members of a group together: the scheduler's view of
the same policy (a snapshot) only chooses, the claim decides.

Truth: the claims are the truth for usage; the VO/group books are derived from them in the same scripts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from provisioner.errors import ValidationError
from provisioner.state.base import StoreBase, guarded
from provisioner.state.keys import check_id


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    host: str
    instance_id: str
    vcpus: int
    memory_mib: int
    vo: str | None = None  # counted against the VO's quota (and its usage books) when set
    group: str | None = None  # anti-affinity group: no two members on one host
    max_instances: int | None = None  # the VO's quota as configured (None = no limit)
    max_vcpus: int | None = None


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Outcome of claim_batch.  ``codes`` per instance: ok | missing | state:<state> | no_lease | capacity |
    anti_affinity | quota."""

    committed: bool
    codes: dict[str, str]

    @property
    def failed(self) -> dict[str, str]:
        return {i: c for i, c in self.codes.items() if c != "ok"}


def _claim_args(c: ClaimRequest) -> list[Any]:
    check_id(c.host, "host name")
    check_id(c.instance_id, "instance id")
    if not (isinstance(c.vcpus, int) and isinstance(c.memory_mib, int)) or c.vcpus < 0 or c.memory_mib < 0:
        raise ValidationError(
            f"claim for {c.instance_id} on {c.host}: vcpus={c.vcpus!r} memory_mib={c.memory_mib!r}"
        )
    limits = []
    for what, limit in (("max_instances", c.max_instances), ("max_vcpus", c.max_vcpus)):
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValidationError(f"claim for {c.instance_id}: {what}={limit!r}")
        limits.append(-1 if limit is None else limit)
    vo = check_id(c.vo, "vo") if c.vo is not None else ""
    group = check_id(c.group, "anti-affinity group") if c.group is not None else ""
    return [c.host, c.instance_id, c.vcpus, c.memory_mib, vo, group, *limits]


def _check_overcommit(cpu: float, mem: float) -> None:
    if not (cpu > 0 and mem > 0):
        raise ValidationError(f"claim: overcommit factors must be > 0 (cpu={cpu}, memory={mem})")


class ClaimsMixin(StoreBase):
    @guarded
    def claim(
        self,
        host: str,
        instance_id: str,
        vcpus: int,
        memory_mib: int,
        cpu_overcommit: float = 1.0,
        memory_overcommit: float = 1.0,
        *,
        require_lease: bool = True,
    ) -> bool:
        """Reserve capacity on an up host; False if it does not fit, the host is not up or unknown, or
        (``require_lease``) its agent holds no lease.

        Repeating a claim for the same instance and host is idempotent (only a size change counts).
        """
        result = self.claim_batch(
            [ClaimRequest(host, instance_id, vcpus, memory_mib)],
            (),
            cpu_overcommit,
            memory_overcommit,
            require_lease=require_lease,
        )
        return result.committed

    @guarded
    def claim_batch(
        self,
        claims: Sequence[ClaimRequest],
        releases: Iterable[tuple[str, str]] = (),
        cpu_overcommit: float = 1.0,
        memory_overcommit: float = 1.0,
        *,
        require_lease: bool = True,
    ) -> ClaimResult:
        """ALL-OR-NOTHING: release ``releases`` (host, instance id) and take every claim, or change nothing.

        Each claim is checked against its host (up, and with ``require_lease`` its agent's lease alive: no
        placement on a host whose agent is gone), capacity, its anti-affinity group and its VO quota.

        Failover uses it to commit a whole plan at once, preemptions included: the victims' claims are
        released and the new claims taken in one atomic step.  On rejection ``codes`` tells which claims
        did not fit (checked in order, each seeing the earlier ones of the batch).
        """
        _check_overcommit(cpu_overcommit, memory_overcommit)
        rel = list(releases)
        args: list[Any] = [
            repr(float(cpu_overcommit)),
            repr(float(memory_overcommit)),
            "1" if require_lease else "0",
            len(rel),
        ]
        for host, iid in rel:
            args += [check_id(host, "host name"), check_id(iid, "instance id")]
        for c in claims:
            args += _claim_args(c)
        if not claims and not rel:
            return ClaimResult(True, {})
        out = cast(list[str], self._run("claim", [], args))
        codes = {c.instance_id: code for c, code in zip(claims, out[1:], strict=True)}
        return ClaimResult(out[0] == "committed", codes)

    @guarded
    def release_claim(self, host: str, instance_id: str) -> bool:
        """Give a claim back; True if there was one (releasing twice is harmless)."""
        self.keys.claims(host)  # validates the host name
        check_id(instance_id, "instance id")
        return bool(self._run("release_claim", [], [host, instance_id]))

    @guarded
    def claims_on(self, host: str) -> dict[str, tuple[int, int]]:
        """instance id -> (vcpus, memory_mib) of every claim on the host."""
        raw = cast(dict[str, str], self.r.hgetall(self.keys.claims(host)))
        out: dict[str, tuple[int, int]] = {}
        for iid, value in raw.items():
            v, m = value.split(",")[:2]
            out[iid] = (int(v), int(m))
        return out

    @guarded
    def vo_usage(self, vo: str) -> tuple[int, int]:
        """(instances, vcpus) of the VO holding a claim, as the claim scripts count them for its quota."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hlen(self.keys.vo_members(vo))
        pipe.hget(self.keys.vo_vcpus, vo)
        n, v = pipe.execute()
        return int(n), int(v or 0)

    @guarded
    def group_members(self, host: str) -> dict[str, list[str]]:
        """Anti-affinity group -> its instances holding a claim on the host."""
        raw = cast(dict[str, str], self.r.hgetall(self.keys.anti_affinity(host)))
        return {g: sorted(ids.split(",")) for g, ids in raw.items() if ids}
