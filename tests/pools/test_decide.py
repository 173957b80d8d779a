"""Table-driven tests of the pure decisions: pool targets, the breaker's transition table, reclaim verdicts
and per-VO limits (STYLE 2, 5, 16)."""

from __future__ import annotations

import pytest

from batch_hooks.pools import IdleVM, PoolSettings, PoolView, plan_pool, target
from batch_hooks.reclaim import Action, BatchJob, WorkerVM, judge, judge_all, owner_job
from provisioner.breaker import Breaker, BreakerSettings, BState, Ev, refusal, step
from provisioner.errors import ValidationError
from provisioner.limits import OverLimit, VOLimits, VOUsage, headroom, verdict

NOW = 10_000.0


def idle(*ages: float) -> tuple[IdleVM, ...]:
    return tuple(IdleVM(f"v{i}", NOW - a) for i, a in enumerate(ages))


S = PoolSettings
# (name, settings, pending, idle ages, booting, headroom, may_boot) -> (want, start, released ids)
POOL_ROWS = [
    ("zero stays zero", S(0, 0, 60), 0, (), 0, None, None, 0, 0, ()),
    ("from zero: pending jobs raise the pool", S(0, 5, 60), 3, (), 0, None, None, 3, 3, ()),
    ("demand above max is capped", S(0, 5, 60), 50, (), 0, None, None, 5, 5, ()),
    ("min kept without demand", S(2, 5, 60), 0, (), 0, None, None, 2, 2, ()),
    ("booting VMs count as warm", S(0, 5, 60), 4, (5,), 2, None, None, 4, 1, ()),
    ("enough warm: nothing to do", S(0, 5, 60), 2, (5, 5), 0, None, None, 2, 0, ()),
    ("surplus not yet timed out is kept", S(0, 5, 60), 0, (10, 20), 0, None, None, 0, 0, ()),
    ("back to zero after the idle timeout", S(0, 5, 60), 0, (61, 60, 59), 0, None, None, 0, 0, ("v0", "v1")),
    ("only the surplus goes, oldest first", S(0, 5, 60), 1, (100, 200, 300), 0, None, None, 1, 0,
     ("v2", "v1")),
    ("min is never released", S(2, 5, 60), 0, (100, 200, 300), 0, None, None, 2, 0, ("v2",)),
    ("above max goes at once", S(0, 1, 600), 1, (1, 2, 3), 0, None, None, 1, 0, ("v2", "v1")),
    ("booting VMs are never released", S(0, 1, 0), 0, (), 3, None, None, 0, 0, ()),
    ("limits cap the starts", S(0, 10, 60), 8, (), 0, 3, None, 8, 3, ()),
    ("no headroom: no start", S(0, 10, 60), 8, (), 0, 0, None, 8, 0, ()),
    ("breaker open: no start", S(0, 10, 60), 8, (), 0, None, 0, 8, 0, ()),
    ("breaker half-open: one probe", S(0, 10, 60), 8, (), 0, None, 1, 8, 1, ()),
    ("negative pending is no demand", S(0, 3, 60), -5, (), 0, None, None, 0, 0, ()),
]


@pytest.mark.parametrize(
    "name,settings,pending,ages,booting,room,may_boot,want,start,released",
    POOL_ROWS, ids=[r[0] for r in POOL_ROWS],
)
def test_pool_plan(name: str, settings: PoolSettings, pending: int, ages: tuple[float, ...], booting: int,
                   room: int | None, may_boot: int | None, want: int, start: int,
                   released: tuple[str, ...]) -> None:
    plan = plan_pool(PoolView("cms", settings, pending, idle(*ages), booting, room, may_boot), NOW)
    assert (plan.want, plan.start, plan.release) == (want, start, released)


def test_pool_settings_refused() -> None:
    for bad in ((3, 2, 60), (-1, 2, 60), (0, 10**6, 60), (0, 1, -1)):
        with pytest.raises(ValidationError):
            PoolSettings(*bad)
    assert target(S(1, 4, 0), 10) == 4


B = Breaker
BS = BreakerSettings(failures=3, backoff_s=100, max_backoff_s=300, probe_timeout_s=50)
OP, C, H = BState.OPEN, BState.CLOSED, BState.HALF_OPEN
# (name, before, event, now) -> (state, failures, allowed, retry_at, backoff, event)
BREAKER_ROWS = [
    ("closed admits", B(), Ev.ADMIT, 0, C, 0, True, 0, 0, ""),
    ("closed: first failure counts", B(), Ev.FAILURE, 0, C, 1, True, 0, 0, ""),
    ("closed: n-th failure opens", B(C, 2), Ev.FAILURE, 10, OP, 3, True, 110, 100, "breaker_open"),
    ("closed: success resets the count", B(C, 2), Ev.SUCCESS, 0, C, 0, True, 0, 0, ""),
    ("open refuses before the back-off", B(OP, 3, 100, 110), Ev.ADMIT, 109, OP, 3, False, 110, 100, ""),
    ("open half-opens after the back-off", B(OP, 3, 100, 110), Ev.ADMIT, 110, H, 3, True, 110, 100,
     "breaker_half_open"),
    ("half-open refuses while the probe runs", B(H, 3, 100, 110, 160), Ev.ADMIT, 159, H, 3, False, 110, 100,
     ""),
    ("half-open: a silent probe expires", B(H, 3, 100, 110, 160), Ev.ADMIT, 160, H, 3, True, 110, 100, ""),
    ("half-open: success closes", B(H, 3, 100, 110, 160), Ev.SUCCESS, 120, C, 0, True, 0, 0,
     "breaker_closed"),
    ("half-open: failure reopens, back-off x2", B(H, 3, 100, 110, 160), Ev.FAILURE, 120, OP, 4, True, 320,
     200, "breaker_open"),
    ("back-off capped", B(H, 5, 200, 110, 160), Ev.FAILURE, 120, OP, 6, True, 420, 300, "breaker_open"),
    ("open: late failure counted, still open", B(OP, 3, 100, 110), Ev.FAILURE, 50, OP, 4, True, 110, 100, ""),
    ("open: late success closes", B(OP, 3, 100, 110), Ev.SUCCESS, 50, C, 0, True, 0, 0, "breaker_closed"),
    ("reset closes", B(OP, 3, 100, 110), Ev.RESET, 50, C, 0, True, 0, 0, "breaker_closed"),
    ("reset of a half-open one", B(H, 3, 100, 110, 160), Ev.RESET, 50, C, 0, True, 0, 0, "breaker_closed"),
    ("reset of a closed one: no event", B(C, 1), Ev.RESET, 50, C, 0, True, 0, 0, ""),
]


@pytest.mark.parametrize(
    "name,before,ev,now,state,failures,allowed,retry_at,backoff,event", BREAKER_ROWS,
    ids=[r[0] for r in BREAKER_ROWS],
)
def test_breaker_table(name: str, before: Breaker, ev: Ev, now: float, state: BState, failures: int,
                       allowed: bool, retry_at: float, backoff: float, event: str) -> None:
    out = step(before, ev, BS, now, "not ready")
    got = (out.breaker.state, out.breaker.failures, out.allowed, out.breaker.retry_at, out.breaker.backoff_s,
           out.event)
    assert got == (state, failures, allowed, retry_at, backoff, event)


def test_every_state_event_pair_has_a_row() -> None:
    covered = {(r[1].state, r[2]) for r in BREAKER_ROWS}
    assert covered == {(s, e) for s in BState for e in Ev}


def test_refusal_message_names_image_count_and_wait() -> None:
    msg = refusal("cms-wn:1.0", B(OP, 3, 100, 110, last_reason="not ready in 30 s"), 50)
    assert msg.startswith("image cms-wn:1.0: circuit open after 3 failed boots; retry after 60 s")


def test_breaker_record_round_trip() -> None:
    b = B(H, 4, 200, 110.5, 160, 2, "x")
    assert Breaker.from_fields(b.to_fields()) == b
    assert Breaker.from_fields({"state": "bogus"}).state is C


JOBS = {"10": BatchJob("10", "RUNNING", 3600), "11": BatchJob("11", "PENDING", None),
        "12": BatchJob("12", "CANCELLED", 3600), "13": BatchJob("13", "COMPLETING", 60)}
GRACE = 300.0
# (name, owner, age) -> (action, why contains)
RECLAIM_ROWS = [
    ("pool VM is not judged", None, 10_000, Action.KEEP, "not a job"),
    ("other cluster", "slurm:other:99", 10_000, Action.KEEP, "not a job"),
    ("other batch system", "htcondor:c1:99", 10_000, Action.KEEP, "not a job"),
    ("malformed owner", "slurm:c1", 10_000, Action.KEEP, "not a job"),
    ("young VM of a vanished job kept", "slurm:c1:99", 100, Action.KEEP, "grace"),
    ("job scancelled without epilog", "slurm:c1:99", 400, Action.RECLAIM, "no longer in the batch system"),
    ("job in an ended state", "slurm:c1:12", 400, Action.RECLAIM, "ended (CANCELLED)"),
    ("running within walltime", "slurm:c1:10", 3000, Action.KEEP, "within walltime"),
    ("running at walltime + grace", "slurm:c1:10", 3900, Action.KEEP, "within walltime"),
    ("running past walltime + grace", "slurm:c1:10", 3901, Action.RECLAIM, "walltime 3600 s + grace"),
    ("no walltime: kept", "slurm:c1:11", 10**7, Action.KEEP, "no walltime"),
    ("completing past walltime", "slurm:c1:13", 361, Action.RECLAIM, "walltime 60 s"),
]


@pytest.mark.parametrize("name,owner,age,action,why", RECLAIM_ROWS, ids=[r[0] for r in RECLAIM_ROWS])
def test_reclaim_table(name: str, owner: str | None, age: float, action: Action, why: str) -> None:
    v = judge(WorkerVM("vm1", owner, NOW - age), JOBS, "slurm", "c1", NOW, GRACE)
    assert v.action is action and why in v.why


def test_failed_batch_read_reclaims_nothing() -> None:
    vms = [WorkerVM("a", "slurm:c1:99", 0.0)]
    assert [v.action for v in judge_all(vms, None, "slurm", "c1", NOW, GRACE)] == [Action.KEEP]
    assert [v.action for v in judge_all(vms, {}, "slurm", "c1", NOW, GRACE)] == [Action.RECLAIM]
    assert owner_job("slurm:c1:5_3", "slurm", "c1") == "5_3"


L = VOLimits
# (name, limits, usage, vcpus) -> (admit, reason contains, headroom for 2-vCPU VMs)
LIMIT_ROWS = [
    ("no limits", L(), VOUsage(100, 400), 4, True, "", None),
    ("under both", L(10, 40), VOUsage(3, 6), 2, True, "", 7),
    ("at max VMs", L(3, None), VOUsage(3, 6), 2, False, "runs 3 of at most 3 VMs", 0),
    ("vCPUs would overflow", L(None, 8, OverLimit.FAIL), VOUsage(2, 7), 2, False,
     "uses 7 of at most 8 vCPUs", 0),
    ("exactly fits vCPUs", L(None, 8), VOUsage(2, 6), 2, True, "", 1),
    ("over (limit lowered)", L(2, None), VOUsage(5, 10), 1, False, "runs 5", 0),
]


@pytest.mark.parametrize("name,limits,usage,vcpus,admit,why,room", LIMIT_ROWS, ids=[r[0] for r in LIMIT_ROWS])
def test_limits_table(name: str, limits: VOLimits, usage: VOUsage, vcpus: int, admit: bool, why: str,
                      room: int | None) -> None:
    v = verdict("cms", limits, usage, vcpus)
    assert v.admit is admit and why in v.reason and v.policy is limits.policy
    assert headroom(limits, usage, 2) == room
