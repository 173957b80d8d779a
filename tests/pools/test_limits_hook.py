"""What a prolog answers (the trusted hook server's reply, batch_hooks.server.handle) when the job's VO is at
its limits (wait -> transient: requeued; fail -> permanent: held with the reason) or its image's circuit
breaker is open, on the test-driver farm."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from batch_hooks.context import JobContext
from batch_hooks.server import handle
from provisioner.breaker import Ev, store_of
from provisioner.control.client import ENDED, release, wait
from provisioner.runtime import Runtime
from tests.control.conftest import Farm

IMAGE = "lhcb-wn:2026.11.0"


@pytest.fixture()
def lhcb_rt(test_farm: Farm) -> Iterator[Runtime]:
    yield test_farm.rt
    for inst in test_farm.rt.store.list_instances():
        if (inst.owner or "").startswith("slurm:lim:"):
            release(test_farm.rt, inst.id)
            wait(test_farm.rt, inst.id, 30, until=ENDED)
    test_farm.rt.store.r.delete(f"dynvm:breaker:{IMAGE}")
    test_farm.rt.store.r.srem("dynvm:breakers", IMAGE)


def limited(rt: Runtime, policy: str, max_instances: int) -> Runtime:
    vos = dict(rt.config.vos)
    vos["lhcb"] = vos["lhcb"].model_copy(update={"max_instances": max_instances, "over_limit": policy})
    return dataclasses.replace(rt, config=rt.config.model_copy(update={"vos": vos}))


def prolog(rt: Runtime, job: str, uid: int) -> dict[str, Any]:
    ctx = JobContext("slurm", "lim", job, 0, "lhcb001", uid, uid)
    now = rt.store.redis_time()
    body = {"v": 1, "op": "prolog", "ctx": ctx.to_dict(), "reply": secrets.token_hex(16), "expires": now + 30}
    return handle(rt, json.dumps(body).encode(), now)[1]


@pytest.mark.parametrize("policy,transient", [("wait", True), ("fail", False)])
def test_vo_at_its_limit_waits_or_fails(lhcb_rt: Runtime, pool_uids: dict[str, int], policy: str,
                                        transient: bool) -> None:
    used = int(lhcb_rt.store.r.hlen("dynvm:vomembers:lhcb"))  # other tests' lhcb VMs, if any
    rt = limited(lhcb_rt, policy, used + 1)
    uid = pool_uids["lhcb001"]
    first = prolog(rt, f"{policy}1", uid)
    assert "instance" in first, first
    second = prolog(rt, f"{policy}2", uid)
    assert second["error"] == "vo_limit" and second["transient"] is transient
    assert second["message"].startswith(f"VO lhcb runs {used + 1} of at most {used + 1} VMs")
    assert f"(policy {policy})" in second["message"]
    assert prolog(rt, f"{policy}1", uid)["instance"] == first["instance"]  # its own VM is not held against it


def test_open_breaker_is_a_clear_transient_hook_error(lhcb_rt: Runtime, pool_uids: dict[str, int]) -> None:
    bs = store_of(lhcb_rt)
    for i in range(bs.settings.failures):
        bs.apply(IMAGE, Ev.FAILURE, "not ready in 120 s", attempt=f"h{i}.1")
    answer = prolog(lhcb_rt, "brk1", pool_uids["lhcb001"])
    assert answer["error"] == "circuit_open" and answer["transient"] is True
    assert answer["message"].startswith(f"image {IMAGE}: circuit open after 3 failed boots; retry after ")
