"""The self-fencing rule, every row."""

from __future__ import annotations

import pytest

from ha.fencing import Action, Isolation, has_quorum, restart_allowed_after, self_fence_action


@pytest.mark.parametrize(
    ("total", "heard", "quorum"),
    [
        (0, 0, True),  # a single-host site: itself is the whole cluster
        (1, 0, False),  # two hosts, the other silent: 1 of 2 is no majority
        (1, 1, True),
        (2, 0, False),
        (2, 1, True),  # 2 of 3
        (3, 1, False),  # 2 of 4 is not a strict majority
        (3, 2, True),
        (4, 2, True),
    ],
)
def test_quorum(total: int, heard: int, quorum: bool) -> None:
    assert has_quorum(total, heard) is quorum


@pytest.mark.parametrize(
    ("since", "total", "heard", "expected"),
    [
        (0.1, 2, 0, Action.NONE),  # renewing fine: peers do not matter
        (0.69, 2, 0, Action.NONE),
        (0.7, 2, 0, Action.FENCE),  # lease at risk, isolated
        (0.7, 2, 1, Action.PAUSE),  # lease at risk, peers answer: Redis outage
        (5.0, 2, 2, Action.PAUSE),
        (5.0, 2, 0, Action.FENCE),
    ],
)
def test_self_fence_action(since: float, total: int, heard: int, expected: Action) -> None:
    assert self_fence_action(Isolation(since, total, heard), lease_ttl_s=1.0, fence_margin_s=0.3) is expected


def test_restart_waits_for_the_slower_of_lease_and_watchdog() -> None:
    assert restart_allowed_after(100.0, lease_ttl_s=1.0, watchdog_s=2.0, margin_s=0.5) == 102.5
    assert restart_allowed_after(100.0, lease_ttl_s=3.0, watchdog_s=2.0, margin_s=0.5) == 103.5
