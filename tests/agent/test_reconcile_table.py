"""The reconciler's decision tables, row by row, from concrete records and libvirt domains.

The expected actions are written here a second time, as a grid, independently of the module's table: a
change to a row must be made in both places, on purpose.  Each row is reached through ``decide`` (so the
classification of states, domain states, hosts and epochs is tested with it), once with the record read
unchanged between the two reads and once with it changed (which must always re-plan).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from provisioner.agent.reconcile import (
    CLAIM_TABLE,
    TABLE,
    Action,
    ClaimAction,
    Observation,
    Phase,
    Seen,
    decide,
    decide_claim,
    diff,
)
from provisioner.interfaces import DomainInfo, DomainState
from provisioner.model import Instance, InstanceState, Role

NOW = 1_000_000.0
GRACE = 300.0
ME, OTHER = "hv1", "hv2"
S = InstanceState

# phase      where  | absent   alive    down        (where: the record's host is this host or not)
EXPECTED = """
none         other  | keep     destroy  destroy
pending      here   | keep     destroy  destroy
pending      other  | keep     destroy  destroy
starting     here   | keep     keep     keep
starting     other  | keep     destroy  destroy
stalled      here   | redrive  redrive  redrive
stalled      other  | keep     destroy  destroy
running      here   | lost     keep     lost
running      other  | keep     destroy  destroy
migrating    here   | keep     keep     keep
migrating    other  | keep     keep     keep
mig_stalled  here   | settle   settle   settle
mig_stalled  other  | keep     keep     keep
stopping     here   | keep     keep     keep
stopping     other  | keep     destroy  destroy
stop_stalled here   | release  release  release
stop_stalled other  | keep     destroy  destroy
ended        here   | keep     destroy  destroy
ended        other  | keep     destroy  destroy
"""
WORDS = {
    "keep": Action.KEEP,
    "destroy": Action.DESTROY_ORPHAN,
    "lost": Action.MARK_LOST,
    "redrive": Action.REDRIVE_BOOT,
    "release": Action.REDRIVE_RELEASE,
    "settle": Action.SETTLE_MIGRATION,
}
# One concrete record state per phase (the others of the phase are covered by test_every_state_has_a_phase).
STATE_OF = {
    Phase.PENDING: S.REQUESTED,
    Phase.STARTING: S.BOOTING,
    Phase.STALLED: S.PLACED,
    Phase.RUNNING: S.READY,
    Phase.MIGRATING: S.MIGRATING,
    Phase.MIG_STALLED: S.MIGRATING,
    Phase.STOPPING: S.STOPPING,
    Phase.STOP_STALLED: S.STOPPING,
    Phase.ENDED: S.LOST,
}
DOMAIN_OF = {Seen.ABSENT: None, Seen.ALIVE: DomainState.RUNNING, Seen.DOWN: DomainState.SHUTOFF}


def rec(
    iid: str, state: InstanceState, host: str | None = ME, updated: float = NOW - 3600, epoch: int = 3
) -> Instance:
    return Instance(
        id=iid,
        role=Role.WORKER,
        image="cms-wn:1",
        vcpus=1,
        memory_mib=256,
        state=state,
        host=host,
        updated=updated,
        epoch=epoch,
    )


def dom(iid: str, state: DomainState = DomainState.RUNNING) -> DomainInfo:
    return DomainInfo(name=f"dynvm-{iid}", uuid="u", state=state, metadata={"instance_id": iid})


def rows() -> list[tuple[Phase, bool, Seen, Action]]:
    out = []
    for line in EXPECTED.strip().splitlines():
        left, right = line.split("|")
        phase, where = left.split()
        for seen, word in zip(Seen, right.split(), strict=True):
            out.append((Phase(phase), where == "here", seen, WORDS[word]))
    return out


def observation(phase: Phase, here: bool, seen: Seen, current: bool) -> Observation:
    """Concrete reads that make this row: the record read after libvirt (``record``) and the one read
    before from this host's index (``first``: None when the record was not on this host then)."""
    iid = "x1"
    record = None
    if phase is not Phase.NONE:
        updated = NOW - 10 if phase in (Phase.STARTING, Phase.STOPPING, Phase.MIGRATING) else NOW - 3600
        record = rec(iid, STATE_OF[phase], host=ME if here else OTHER, updated=updated)
    first = record if record is not None and here else None
    if not current:  # the other read disagrees: a placement or move happened between the two
        first = rec(iid, S.READY, host=ME, epoch=2) if first is None else dataclasses.replace(first, epoch=2)
    state = DOMAIN_OF[seen]
    return Observation(iid, first, record, None if state is None else dom(iid, state))


@pytest.mark.parametrize(
    ("phase", "here", "seen", "want"),
    rows(),
    ids=[f"{p.value}-{'here' if h else 'other'}-{s.value}" for p, h, s, _ in rows()],
)
def test_every_row(phase: Phase, here: bool, seen: Seen, want: Action) -> None:
    d = decide(ME, observation(phase, here, seen, current=True), NOW, GRACE, startup=False)
    assert d.key == (phase, seen, here, True)
    assert d.action is want


@pytest.mark.parametrize(
    ("phase", "here", "seen", "want"),
    rows(),
    ids=[f"{p.value}-{'here' if h else 'other'}-{s.value}" for p, h, s, _ in rows()],
)
def test_every_row_read_twice_differently_is_replanned(
    phase: Phase, here: bool, seen: Seen, want: Action
) -> None:
    d = decide(ME, observation(phase, here, seen, current=False), NOW, GRACE, startup=False)
    assert d.key == (phase, seen, here, False)
    assert d.action is Action.REPLAN


def test_the_table_is_total_and_has_only_these_rows() -> None:
    expected = {(p, s, h, c) for p, h, s, _ in rows() for c in (True, False)}
    assert set(TABLE) == expected
    # every phase/where combination that can occur has its rows (no record is never "here")
    assert {(p, h) for p, h, _, _ in rows()} == (
        set(itertools.product(Phase, (True, False))) - {(Phase.NONE, True)}
    )


def test_every_state_has_a_phase() -> None:
    from provisioner.agent.reconcile import phase_of

    want = {
        S.REQUESTED: Phase.PENDING,
        S.PLACED: Phase.STARTING,
        S.BOOTING: Phase.STARTING,
        S.READY: Phase.RUNNING,
        S.DRAINING: Phase.RUNNING,
        S.MIGRATING: Phase.MIGRATING,
        S.STOPPING: Phase.STOPPING,
        S.GONE: Phase.ENDED,
        S.FAILED: Phase.ENDED,
        S.LOST: Phase.ENDED,
    }
    for state in InstanceState:
        assert phase_of(rec("a", state, updated=NOW - 1), NOW, GRACE, startup=False) is want[state]
    # a boot past its grace, or any unfinished boot found when the agent starts, is stalled
    assert phase_of(rec("a", S.BOOTING, updated=NOW - GRACE - 1), NOW, GRACE, False) is Phase.STALLED
    assert phase_of(rec("a", S.PLACED, updated=NOW - 1), NOW, GRACE, startup=True) is Phase.STALLED
    # the same for a release (its message lost: nothing else would ever finish it)
    assert phase_of(rec("a", S.STOPPING, updated=NOW - GRACE - 1), NOW, GRACE, False) is Phase.STOP_STALLED
    assert phase_of(rec("a", S.STOPPING, updated=NOW - 1), NOW, GRACE, startup=True) is Phase.STOP_STALLED
    # and for either at once when this agent's own retry of it was refused by the broker
    assert phase_of(rec("a", S.BOOTING, updated=NOW - 1), NOW, GRACE, False, lost=True) is Phase.STALLED
    assert phase_of(rec("a", S.STOPPING, updated=NOW - 1), NOW, GRACE, False, lost=True) is Phase.STOP_STALLED
    assert phase_of(rec("a", S.READY, updated=NOW - 1), NOW, GRACE, False, lost=True) is Phase.RUNNING
    # a move nobody finished (its agent died mid-migration, or its landing was never written)
    assert phase_of(rec("a", S.MIGRATING, updated=NOW - GRACE - 1), NOW, GRACE, False) is Phase.MIG_STALLED
    assert phase_of(rec("a", S.MIGRATING, updated=NOW - 1), NOW, GRACE, startup=True) is Phase.MIG_STALLED
    assert phase_of(rec("a", S.MIGRATING, updated=NOW - 1), NOW, GRACE, False, lost=True) is Phase.MIG_STALLED
    assert phase_of(None, NOW, GRACE, False) is Phase.NONE


def test_paused_is_alive_and_crashed_is_down() -> None:
    ready = rec("a", S.READY)
    for state, action in (
        (DomainState.PAUSED, Action.KEEP),
        (DomainState.CRASHED, Action.MARK_LOST),
        (DomainState.OTHER, Action.MARK_LOST),
        (DomainState.MISSING, Action.MARK_LOST),
    ):
        assert decide(ME, Observation("a", ready, ready, dom("a", state)), NOW, GRACE, False).action is action


# --- named rows: migrations in flight and VMs that just moved -------------------------------------------


def test_migration_in_flight_is_kept_on_both_hosts() -> None:
    moving = rec("mig1", S.MIGRATING, host=OTHER, updated=NOW - 10)  # hv2 -> hv1: the domain lands here first
    d = diff(ME, [dom("mig1")], [], NOW, GRACE, False, elsewhere={"mig1": moving})
    assert (d.orphans, d.ghosts, d.replanned, d.settled) == ([], [], [], [])
    leaving = rec("mig1", S.MIGRATING, host=ME, updated=NOW - 10)  # hv1 -> hv2: left, the record not yet
    d = diff(ME, [], [leaving], NOW, GRACE, False)
    assert (d.orphans, d.ghosts, d.replanned, d.settled) == ([], [], [], [])
    # past the grace (or at start-up) the source settles it; the destination still keeps it
    stale = dataclasses.replace(leaving, updated=NOW - GRACE - 1)
    assert diff(ME, [], [stale], NOW, GRACE, False).settled == ["mig1"]
    assert diff(ME, [], [leaving], NOW, GRACE, True).settled == ["mig1"]
    far = dataclasses.replace(moving, updated=NOW - GRACE - 1)
    assert diff(ME, [dom("mig1")], [], NOW, GRACE, False, elsewhere={"mig1": far}).orphans == []


def test_a_migration_landing_between_the_two_reads_is_not_an_orphan() -> None:
    """Reported: the index read missed mig1 (still migrating, on hv2), the migration landed, libvirt showed
    the domain here and the record read after said READY on hv1: the old code destroyed the healthy VM."""
    landed = rec("mig1", S.READY, host=ME, epoch=4)
    d = diff(ME, [dom("mig1")], [], NOW, GRACE, False, elsewhere={"mig1": landed})
    assert d.orphans == []
    assert d.replanned == ["mig1"]
    # read again on the next pass (both reads agree now): kept as a healthy VM of this host
    again = diff(ME, [dom("mig1")], [landed], NOW, GRACE, False)
    assert (again.orphans, again.ghosts, again.replanned) == ([], [], [])


def test_a_vm_that_just_moved_away_is_not_a_ghost() -> None:
    """Reported: READY on hv1 in the index read, migrated to hv2 before libvirt was listed: the old code
    marked it lost (and so released its new claim on hv2)."""
    before = rec("mig1", S.READY, host=ME, epoch=3)
    after = rec("mig1", S.READY, host=OTHER, epoch=4)
    d = decide(ME, Observation("mig1", before, after, None), NOW, GRACE, False)
    assert d.key == (Phase.RUNNING, Seen.ABSENT, False, False) and d.action is Action.REPLAN
    # the next pass does not see it at all: it is not in hv1's index and has no domain here
    nothing = diff(ME, [], [], NOW, GRACE, False, elsewhere={"mig1": after})
    assert (nothing.orphans, nothing.ghosts, nothing.replanned) == ([], [], [])


def test_a_vm_placed_anew_on_this_host_between_reads_is_replanned() -> None:
    """Same host, same state, new epoch (lost, recovered and booted here again): no decision of the old
    placement applies to the new one."""
    old = rec("s1", S.READY, host=ME, epoch=3)
    new = rec("s1", S.READY, host=ME, epoch=5)
    assert decide(ME, Observation("s1", old, new, None), NOW, GRACE, False).action is Action.REPLAN


def test_an_ended_record_left_out_of_the_hot_index_read_is_current() -> None:
    """The host's index read returns live records only; the domain of a record that ended here is still
    an orphan (read once, after libvirt), not a record that changed between the reads."""
    ended = rec("old1", S.GONE, host=ME)
    d = decide(ME, Observation("old1", None, ended, dom("old1")), NOW, GRACE, False)
    assert d.key == (Phase.ENDED, Seen.ALIVE, True, True) and d.action is Action.DESTROY_ORPHAN
    # whereas a live record on this host that the first read did not see has just arrived
    arrived = rec("new1", S.PLACED, host=ME, updated=NOW - 1)
    assert (
        decide(ME, Observation("new1", None, arrived, dom("new1")), NOW, GRACE, False).action is Action.REPLAN
    )


def test_a_stale_copy_of_a_vm_that_runs_elsewhere_goes() -> None:
    settled = rec("mig1", S.READY, host=OTHER)
    d = diff(ME, [dom("mig1")], [], NOW, GRACE, False, elsewhere={"mig1": settled})
    assert d.orphans == ["dynvm-mig1"]  # the record says it runs on hv2 (both reads agree): not here


def test_diff_lists_orphans_ghosts_and_redrives_and_never_touches_foreign_domains() -> None:
    records = [
        rec("ready1", S.READY),
        rec("ghost1", S.READY),
        rec("gone1", S.GONE),
        rec("boot1", S.BOOTING, updated=NOW - 1),
    ]
    domains = [
        dom("ready1"),
        dom("gone1"),
        dom("unknown1"),
        dom("boot1"),
        DomainInfo(name="foreign", uuid="f", state=DomainState.RUNNING, metadata={}),
    ]
    d = diff(ME, domains, records, NOW, GRACE, startup=False)
    assert sorted(d.orphans) == ["dynvm-gone1", "dynvm-unknown1"]
    assert d.ghosts == ["ghost1"]
    assert d.redrive == []
    assert diff(ME, domains, records, NOW, GRACE, startup=True).redrive == ["boot1"]


# --- claims ----------------------------------------------------------------------------------------------

CLAIMS_EXPECTED = """
none       other  release
pending    here   keep
pending    other  keep
starting   here   keep
starting   other  release
running    here   keep
running    other  release
migrating  here   keep
migrating  other  keep
stopping   here   keep
stopping   other  release
ended      here   release
ended      other  release
"""


def claim_rows() -> list[tuple[Phase, bool, ClaimAction]]:
    out = []
    for line in CLAIMS_EXPECTED.strip().splitlines():
        phase, where, word = line.split()
        out.append((Phase(phase), where == "here", ClaimAction(word)))
    return out


@pytest.mark.parametrize(
    ("phase", "here", "want"),
    claim_rows(),
    ids=[f"{p.value}-{'here' if h else 'other'}" for p, h, _ in claim_rows()],
)
def test_every_claim_row(phase: Phase, here: bool, want: ClaimAction) -> None:
    record = None
    if phase is not Phase.NONE:
        record = rec("c1", STATE_OF[phase], host=ME if here else OTHER)
    assert decide_claim(ME, record, NOW) is want
    if record is not None:  # a record changed within the grace may be about to explain the claim
        assert decide_claim(ME, dataclasses.replace(record, updated=NOW - 1), NOW) is ClaimAction.KEEP


def test_the_claim_table_is_total() -> None:
    assert set(CLAIM_TABLE) == {(p, h) for p, h, _ in claim_rows()}


def test_a_redrive_that_meets_redis_down_again_is_kept_for_the_next_pass_and_no_other() -> None:
    """The do-part's bookkeeping of lost retries (the real path: tests/agent/test_redis_kill_boot.py)."""
    import threading
    import types

    from provisioner.agent.redrive import again_if_redis_is_down
    from provisioner.errors import HypervisorError, UnavailableError

    rt = types.SimpleNamespace(lock=threading.Lock(), lost_retries=set())
    with pytest.raises(UnavailableError), again_if_redis_is_down(rt, "x1"):  # type: ignore[arg-type]
        raise UnavailableError("redis at redis://h:1/0 is unreachable")
    assert rt.lost_retries == {"x1"}
    # a boot that fails for another reason is left to the grace: not re-driven on every pass
    with pytest.raises(HypervisorError), again_if_redis_is_down(rt, "x2"):  # type: ignore[arg-type]
        raise HypervisorError("qemu:///system: define and start: internal error")
    with again_if_redis_is_down(rt, "x3"):  # type: ignore[arg-type]
        pass
    assert rt.lost_retries == {"x1"}
