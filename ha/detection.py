"""Host death verdicts: pure functions over what the monitor observed (decide; the monitor loop does).

A host is declared dead only when its lease has been silent longer than its detection class allows
(``dead_after_s``, counted from the last successful renewal on Redis's clock) in ``samples`` consecutive
observations (masakari-monitors' stabilised status): one late renewal is not a death.  A host back in
watch (an operator's rejoin after a death, the end of a maintenance) is judged from its return if its
last renewal is older (``heard_at``; the return is on the host record).  When more than a configured
share of the hosts would be declared dead at once, the verdict is held for an operator (a fencing storm
usually means the network or the control plane, not the hosts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from provisioner.model import WATCHED_HOST_STATES, HostState


class Verdict(StrEnum):
    ALIVE = "alive"  # renewed within its lease
    LATE = "late"  # past its lease but not yet past dead_after_s
    SILENT = "silent"  # past dead_after_s: a death candidate, not yet debounced
    DEAD = "dead"  # silent for `samples` consecutive observations: declare it
    HELD = "held"  # would be dead, but the storm guard holds automatic failover
    IGNORED = "ignored"  # not watched (maintenance, already dead or fenced)
    CUT_OFF = "cut_off"  # silent on Redis, but most live peers still hear it: its agent pauses, so must we


@dataclass(frozen=True, slots=True)
class Timing:
    """A detection class (provisioner.config.DetectionClass) as the pure code needs it."""

    lease_ttl_s: float
    dead_after_s: float
    samples: int


@dataclass(frozen=True, slots=True)
class Observation:
    """One host as the monitor read it: its state, and the age of its last renewal on Redis's clock."""

    host: str
    state: HostState
    silence_s: float  # redis_now - last_seen (last successful lease renewal)
    lease_alive: bool
    timing: Timing
    # A strict majority of the hosts with a live lease reported hearing this one over UDP lately: its agent
    # is alive and keeps its VMs (a Redis-only outage pauses HA), so it must not be failed over.
    heard_by_peers: bool = False


@dataclass(slots=True)
class Outcome:
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # consecutive silent observations per host
    storm: bool = False

    @property
    def dead(self) -> list[str]:
        return sorted(h for h, v in self.verdicts.items() if v is Verdict.DEAD)

    @property
    def held(self) -> list[str]:
        return sorted(h for h, v in self.verdicts.items() if v is Verdict.HELD)


def classify(obs: Observation) -> Verdict:
    """One observation on its own (no debounce)."""
    if obs.state not in WATCHED_HOST_STATES:
        return Verdict.IGNORED
    if obs.lease_alive and obs.silence_s <= obs.timing.lease_ttl_s:
        return Verdict.ALIVE
    if obs.silence_s <= obs.timing.dead_after_s:
        return Verdict.LATE
    if obs.heard_by_peers:
        return Verdict.CUT_OFF
    return Verdict.SILENT


def heard_by_majority(host: str, reports: Mapping[str, Sequence[str]], live: set[str]) -> bool:
    """Whether a strict majority of the live hosts other than ``host`` report hearing it (reports of hosts
    without a live lease do not count: a dead reporter's last word is stale)."""
    voters = [h for h in live if h != host]
    heard = sum(1 for h in voters if host in reports.get(h, ()))
    return bool(voters) and 2 * heard > len(voters)


def judge(
    observations: Sequence[Observation],
    previous_counts: Mapping[str, int],
    storm_share: float,
    already_dead: int = 0,
) -> Outcome:
    """Debounce this round's observations against the previous rounds' counts.

    ``storm_share``: if the hosts that would be dead (this round's plus ``already_dead`` not yet
    recovered) exceed this share of all watched and dead hosts, every new death is HELD instead.
    """
    out = Outcome()
    for obs in observations:
        v = classify(obs)
        if v is Verdict.SILENT:
            n = previous_counts.get(obs.host, 0) + 1
            out.counts[obs.host] = n
            if n >= obs.timing.samples:
                v = Verdict.DEAD
        out.verdicts[obs.host] = v
    newly = out.dead
    considered = sum(1 for v in out.verdicts.values() if v is not Verdict.IGNORED) + already_dead
    # Hosts that have missed two renewals (agents renew every third of the lease) are dying "at once" with
    # the dead ones: deaths a renewal period apart are debounced in different rounds, and the first must
    # not slip through the guard alone.
    failing = {
        o.host for o in observations
        if o.host not in newly and out.verdicts[o.host] is not Verdict.IGNORED
        and o.silence_s > o.timing.lease_ttl_s * 2 / 3
    }
    if newly and considered and (len(newly) + len(failing) + already_dead) / considered > storm_share:
        out.storm = True
        for h in newly:
            out.verdicts[h] = Verdict.HELD
    return out


def heard_at(state: HostState, last_seen: float, watched_since: float) -> float:
    """Redis time a host's silence counts from: its last renewal, or its return to watch if that is later.

    A host leaves watch when it dies (dead, fenced) or goes into maintenance, and comes back by an
    operator's move (``dynvm host rejoin``, the end of maintenance).  Judged on the renewal it made before
    it left, a host back before its agent's next renewal was silent for its whole absence and was declared
    dead again within ``samples`` rounds (benchmarks/bench_failover.py saw it, the next trial found the
    host fenced).  Counted from its return, a host whose agent never renews is still dead ``dead_after_s``
    later.  The return (``watched_since``) is stamped on the host record from Redis's clock by the very
    compare-and-set that moved it back (provisioner.state.hosts.set_host_state), so a leader elected
    after the return judges it as the one that saw it; a fencing deadline computed from it errs late.
    """
    if state not in WATCHED_HOST_STATES:
        return last_seen
    return max(last_seen, watched_since)
