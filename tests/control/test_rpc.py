"""Agent request/reply with a real agent: expired requests are dropped, handler errors come back as errors.

One `dynvm agent` on the libvirt test driver and a real Redis (tests/control/ministack.py); the agent is
stopped and started again as a process, so the requests it finds on its queue are really old.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.control.inventory import host_inventory
from provisioner.errors import DeadlineExceeded, PermanentError
from provisioner.messaging import INVENTORY
from provisioner.rpc import call_agent
from tests.conftest import wait_until
from tests.control.ministack import mini_stack, stack_config

pytestmark = [pytest.mark.redis, pytest.mark.libvirt, pytest.mark.slow]


def test_agent_back_from_an_outage_drops_expired_requests(redis_url: str, tmp_path: Path) -> None:
    cfg = stack_config(tmp_path, redis_url, ["hv1"], cpus=4)
    with mini_stack(tmp_path / "stack", cfg, workers=0) as stack:
        rt = stack.rt
        assert host_inventory(rt, "hv1", 30) == []  # the agent answers while it is there
        stack.stop("agent-hv1")
        for _ in range(2):
            with pytest.raises(DeadlineExceeded):
                call_agent(rt, "hv1", INVENTORY, [], 0.5)
        stack.start("agent-hv1", "agent", "--host", "hv1")
        log = wait_until(
            lambda: (text := stack.log("agent-hv1")).count("dropping inventory request") >= 2 and text,
            timeout=60,
            interval=0.2,
            what="the restarted agent to drop both stale requests",
        )
        assert "expired" in log
        # Nothing was answered to the callers that had gone: no reply list was ever written.
        assert not list(rt.store.r.scan_iter(f"{rt.store.keys.prefix}:reply:*"))
        assert host_inventory(rt, "hv1", 30) == []  # and fresh requests are served again


def test_an_unexpected_handler_error_is_an_error_reply_not_a_timeout(redis_url: str, tmp_path: Path) -> None:
    cfg = stack_config(tmp_path, redis_url, ["hv1"], cpus=4)
    with mini_stack(tmp_path / "stack", cfg, workers=0) as stack:
        # A request the handler cannot take (as from a client of another version): a TypeError in the
        # agent, which must come back as an error (before, the caller waited out its deadline).
        with pytest.raises(PermanentError, match="agent on hv1: inventory failed: TypeError"):
            call_agent(stack.rt, "hv1", INVENTORY, ["from-a-newer-client"], 60)
        agent_log = stack.log("agent-hv1")
        assert all(s in agent_log for s in ("inventory request", "failed unexpectedly", "TypeError"))
        # The caller took its reply; the agent still answers well-formed requests.
        assert not list(stack.rt.store.r.scan_iter(f"{stack.rt.store.keys.prefix}:reply:*"))
        assert host_inventory(stack.rt, "hv1", 30) == []
