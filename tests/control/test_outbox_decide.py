"""The sweeper's decision table, row by row (pure: no Redis)."""

from __future__ import annotations

import pytest

from provisioner.config import OutboxConfig
from provisioner.control.sweeper import Decision, Observed, Verdict, decide
from provisioner.model import Capacity, Host, Instance, InstanceState, Role

CFG = OutboxConfig(
    resend_after_s=5, pickup_deadline_s=60, boot_after_s=30, replace_after_s=15, max_placements=3
)
PROVISION_S = 300.0
NOW = 10_000.0
S = InstanceState


def _inst(state: S, age: float, host: str | None = None, attempts: int = 0) -> Instance:
    t = NOW - age
    return Instance(
        id="i1",
        role=Role.WORKER,
        image="cms-wn:1",
        vcpus=1,
        memory_mib=512,
        state=state,
        host=host,
        created=t,
        updated=t,
        attempts=attempts,
    )


def _host(lease: bool, seen_ago: float) -> Host:
    return Host(
        name="hv1",
        uri="test:///default",
        capacity=Capacity(8, 8192),
        last_seen=NOW - seen_ago,
        lease_alive=lease,
    )


ALWAYS = 0.0  # workers alive since long before every record


@pytest.mark.parametrize(
    ("obs", "since", "verdict", "words"),
    [
        # requested
        (Observed(_inst(S.REQUESTED, 2)), ALWAYS, Verdict.KEEP, ""),
        (Observed(_inst(S.REQUESTED, 6)), ALWAYS, Verdict.RESEND, "no control worker is on it"),
        (Observed(_inst(S.REQUESTED, 20), picked_at=NOW - 1), ALWAYS, Verdict.KEEP, ""),
        (Observed(_inst(S.REQUESTED, 20), picked_at=NOW - 6), ALWAYS, Verdict.RESEND, ""),
        # never picked up, and no worker was alive until long after its deadline
        (
            Observed(_inst(S.REQUESTED, 100)),
            NOW - 1,
            Verdict.FAIL,
            "no control worker picked it up within 60 s",
        ),
        # never picked up, but workers were alive all along (a backlog): re-send, never "nobody picked it up"
        (Observed(_inst(S.REQUESTED, 100)), ALWAYS, Verdict.RESEND, ""),
        (
            Observed(_inst(S.REQUESTED, 301), picked_at=NOW - 1),
            ALWAYS,
            Verdict.FAIL,
            "not placed within 300 s",
        ),
        # placed, agent alive
        (Observed(_inst(S.PLACED, 10, "hv1"), host=_host(True, 1)), ALWAYS, Verdict.KEEP, ""),
        (
            Observed(_inst(S.PLACED, 31, "hv1"), host=_host(True, 1)),
            ALWAYS,
            Verdict.REBOOT,
            "has not started",
        ),
        (Observed(_inst(S.PLACED, 301, "hv1"), host=_host(True, 1)), ALWAYS, Verdict.FAIL, "within 300 s"),
        # placed, no lease: wait out replace_after_s from the later of placement and the last renewal
        (Observed(_inst(S.PLACED, 10, "hv1"), host=_host(False, 100)), ALWAYS, Verdict.KEEP, ""),
        (Observed(_inst(S.PLACED, 40, "hv1"), host=_host(False, 5)), ALWAYS, Verdict.KEEP, ""),
        (
            Observed(_inst(S.PLACED, 40, "hv1"), host=_host(False, 20)),
            ALWAYS,
            Verdict.REPLACE,
            "holds no lease",
        ),
        (Observed(_inst(S.PLACED, 40, "hv1"), host=None), ALWAYS, Verdict.REPLACE, "holds no lease"),
        (
            Observed(_inst(S.PLACED, 40, "hv1", attempts=2), host=_host(False, 20)),
            ALWAYS,
            Verdict.FAIL,
            "never started it (3 placements)",
        ),
        # other states are not the sweeper's
        (Observed(_inst(S.BOOTING, 1000, "hv1"), host=_host(False, 1000)), ALWAYS, Verdict.KEEP, ""),
        (Observed(_inst(S.READY, 1000, "hv1"), host=_host(True, 1)), ALWAYS, Verdict.KEEP, ""),
    ],
)
def test_decide(obs: Observed, since: float, verdict: Verdict, words: str) -> None:
    d = decide(obs, NOW, since, CFG, PROVISION_S)
    assert isinstance(d, Decision)
    assert d.verdict is verdict
    assert words in d.reason


def test_the_loop_survives_any_exception_and_counts_it() -> None:
    """A sweep raising anything (here a bug, then a Redis outage) is counted and the loop goes on."""
    import threading
    from types import SimpleNamespace
    from typing import cast

    from provisioner.config import Config
    from provisioner.control.sweeper import Sweeper
    from provisioner.errors import UnavailableError
    from provisioner.runtime import Runtime

    done = threading.Event()

    class Flaky(Sweeper):
        calls = 0

        def sweep_once(self) -> dict[str, int]:
            self.calls += 1
            if self.calls == 1:
                raise ValueError("a bug\nsecond line")
            if self.calls == 2:
                raise UnavailableError("redis at redis://x is unreachable")
            done.set()
            self.stop.set()
            return {}

    rt = cast(Runtime, SimpleNamespace(config=Config(outbox=OutboxConfig(sweep_interval_s=0.01)), store=None))
    sw = Flaky(rt, "w1")
    t = sw.start()
    assert done.wait(10)
    t.join(10)
    assert sw.calls == 3 and sw.errors == 2
    assert sw.last_error == "UnavailableError: redis at redis://x is unreachable"
