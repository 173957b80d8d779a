"""Capacity claims: the one place that decides whether a host still has room, atomically in Redis.

A claim is ``dynvm:claims:HOST`` field INSTANCE = "vcpus,memory_mib"; the host hash keeps
``used_vcpus``/``used_memory_mib`` equal to the sum of its claims.  Both change only inside Lua scripts,
which check the host is up and ``used + request <= floor(capacity * overcommit)`` in the same step, so
any number of concurrent control workers can never overbook a host.
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


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Outcome of claim_batch.  ``codes`` per instance: ok | capacity | missing | state:<state>."""

    committed: bool
    codes: dict[str, str]

    @property
    def failed(self) -> dict[str, str]:
        return {i: c for i, c in self.codes.items() if c != "ok"}


def _check_amounts(c: ClaimRequest) -> None:
    check_id(c.host, "host name")
    check_id(c.instance_id, "instance id")
    if not (isinstance(c.vcpus, int) and isinstance(c.memory_mib, int)) or c.vcpus < 0 or c.memory_mib < 0:
        raise ValidationError(
            f"claim for {c.instance_id} on {c.host}: vcpus={c.vcpus!r} memory_mib={c.memory_mib!r}"
        )


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
    ) -> bool:
        """Reserve capacity on an up host; False if it does not fit, the host is not up or unknown.

        Repeating a claim for the same instance and host is idempotent (only a size change counts).
        """
        result = self.claim_batch(
            [ClaimRequest(host, instance_id, vcpus, memory_mib)], (), cpu_overcommit, memory_overcommit
        )
        return result.committed

    @guarded
    def claim_batch(
        self,
        claims: Sequence[ClaimRequest],
        releases: Iterable[tuple[str, str]] = (),
        cpu_overcommit: float = 1.0,
        memory_overcommit: float = 1.0,
    ) -> ClaimResult:
        """ALL-OR-NOTHING: release ``releases`` (host, instance id) and take every claim, or change nothing.

        Failover uses it to commit a whole plan at once, preemptions included: the victims' claims are
        released and the new claims taken in one atomic step.  On rejection ``codes`` tells which claims
        did not fit (checked in order, each seeing the earlier ones of the batch).
        """
        _check_overcommit(cpu_overcommit, memory_overcommit)
        rel = list(releases)
        args: list[Any] = [repr(float(cpu_overcommit)), repr(float(memory_overcommit)), len(rel)]
        for host, iid in rel:
            args += [check_id(host, "host name"), check_id(iid, "instance id")]
        for c in claims:
            _check_amounts(c)
            args += [c.host, c.instance_id, c.vcpus, c.memory_mib]
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
            v, m = value.split(",", 1)
            out[iid] = (int(v), int(m))
        return out
