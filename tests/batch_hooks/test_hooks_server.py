"""The hook contract end to end on the test-driver farm: a light hook (its own RESP client, a real Redis ACL
user) asks the control workers for its job's VM; the VO comes from the uid only; per-job credentials reach
nothing but their own job."""

from __future__ import annotations

import contextlib
import json
import logging
import pwd
import secrets
from collections.abc import Iterator

import pytest

from batch_hooks.context import JobContext, job_key
from batch_hooks.proto import call, hooks_key, jobvm_key, jobvms_key, reply_key
from batch_hooks.resp import LightRedis, RedisReplyError
from provisioner.control.client import ENDED, wait
from provisioner.errors import DeadlineExceeded, IdentityError, UnknownVOError, ValidationError
from provisioner.model import InstanceState
from tests.batch_hooks.conftest import user_url
from tests.conftest import wait_until
from tests.control.conftest import Farm

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


def ctx_for(user: str, job_id: str | None = None, attempt: int = 0, **kw: object) -> JobContext:
    pw = pwd.getpwnam(user)
    return JobContext(batch="slurm", cluster="t", job_id=job_id or str(secrets.randbelow(10**9)),
                      attempt=attempt, user=user, uid=pw.pw_uid, gid=pw.pw_gid, **kw)  # type: ignore[arg-type]


def test_three_vos_each_get_their_own_image_and_release_it(farm: Farm, hook_url: str) -> None:
    vms = {}
    with LightRedis(hook_url) as r:
        for vo in ("cms", "atlas", "lhcb"):
            ctx = ctx_for(f"{vo}001")
            vm = call(r, "dynvm", "prolog", ctx, 60)
            inst = farm.rt.store.require_instance(vm["instance"])
            assert (vm["vo"], inst.vo, inst.state) == (vo, vo, InstanceState.READY)
            assert inst.image.startswith(f"{vo}-wn:") and inst.owner == f"slurm:t:{ctx.job_id}"
            vms[vo] = (ctx, inst.id)
        for ctx, iid in vms.values():
            assert call(r, "dynvm", "epilog", ctx, 30)["released"] is True
            assert wait(farm.rt, iid, 30, until=ENDED).state is InstanceState.GONE
            assert not farm.rt.store.r.exists(jobvm_key("dynvm", ctx.key))


def test_same_attempt_is_idempotent_and_a_requeued_attempt_gets_a_fresh_vm(farm: Farm, hook_url: str) -> None:
    with LightRedis(hook_url) as r:
        first = call(r, "dynvm", "prolog", ctx_for("cms001", "77"), 60)
        again = call(r, "dynvm", "prolog", ctx_for("cms001", "77"), 60)
        assert again["instance"] == first["instance"]
        call(r, "dynvm", "epilog", ctx_for("cms001", "77"), 30)
        second = call(r, "dynvm", "prolog", ctx_for("cms001", "77", attempt=1), 60)
        assert second["instance"] != first["instance"]
        call(r, "dynvm", "epilog", ctx_for("cms001", "77", attempt=1), 30)


def test_unknown_vo_and_unknown_user_are_permanent_errors(farm: Farm, hook_url: str) -> None:
    with LightRedis(hook_url) as r:
        with pytest.raises(UnknownVOError, match="alice"):
            call(r, "dynvm", "prolog", ctx_for("alice001"), 30)
        ghost = JobContext(batch="slurm", cluster="t", job_id="5", attempt=0, user="nobody1", uid=4_000_000,
                           gid=1)
        with pytest.raises(IdentityError, match="4000000"):
            call(r, "dynvm", "prolog", ghost, 30)
        pw = pwd.getpwnam("atlas001")  # a uid that is atlas's pool account, claimed under cms's name
        liar = JobContext(batch="slurm", cluster="t", job_id="6", attempt=0, user="cms001", uid=pw.pw_uid,
                          gid=pw.pw_gid)
        with pytest.raises(ValidationError, match="not 'cms001'"):
            call(r, "dynvm", "prolog", liar, 30)


def test_over_the_images_hard_limit_is_permanent(farm: Farm, hook_url: str) -> None:
    with LightRedis(hook_url) as r, pytest.raises(ValidationError, match="at most"):
        call(r, "dynvm", "prolog", ctx_for("lhcb001", cpus=4000), 30)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"reply": "x"}',
    json.dumps({"v": 1, "op": "prolog", "reply": "ab" * 16, "expires": 1e12,
                "ctx": {"batch": "slurm", "cluster": "t", "job_id": "1;rm -rf /", "attempt": 0,
                        "user": "cms001", "uid": 1, "gid": 1}}).encode(),
    json.dumps({"v": 1, "op": "prolog", "reply": "ab" * 16, "expires": 1e12,
                "ctx": {"batch": "slurm", "cluster": "t", "job_id": "1", "attempt": 0, "user": "cms001",
                        "uid": 1, "gid": 1, "vo": "atlas"}}).encode(),
    json.dumps({"v": 1, "op": "shell", "reply": "ab" * 16, "expires": 1e12, "ctx": {}}).encode(),
])
def test_hostile_requests_get_an_error_reply_or_are_dropped_never_a_crash(farm: Farm, body: bytes) -> None:
    r = farm.rt.store.r
    r.delete(reply_key("dynvm", "ab" * 16))
    r.lpush(hooks_key("dynvm"), body)
    if b'"reply": "abab' in body:
        got = r.blpop([reply_key("dynvm", "ab" * 16)], timeout=10)
        assert got is not None
        answer = json.loads(got[1])
        assert answer["error"] == "invalid" and answer["transient"] is False
    # The workers still serve: a good request right after is answered.
    wait_until(lambda: r.llen(hooks_key("dynvm")) == 0, 10, what="hooks list drained")


def test_an_expired_request_is_not_acted_on(farm: Farm, hook_url: str) -> None:
    r = farm.rt.store.r
    ctx = ctx_for("cms001")
    secs, _ = r.time()
    body = {"v": 1, "op": "prolog", "ctx": ctx.to_dict(), "reply": "cd" * 16, "expires": secs - 1}
    r.lpush(hooks_key("dynvm"), json.dumps(body))
    wait_until(lambda: r.llen(hooks_key("dynvm")) == 0, 10, what="request popped")
    assert r.blpop([reply_key("dynvm", "cd" * 16)], timeout=1) is None
    assert farm.rt.store.instance_for_key(ctx.key) is None


def test_hook_deadline_is_a_timeout_not_a_hang(farm: Farm, hook_url: str) -> None:
    with LightRedis(hook_url) as r, pytest.raises(DeadlineExceeded):
        # A prefix nobody serves: the call gives up at its deadline.
        r_url_prefix = "nobody"
        with pytest.raises(RedisReplyError, match="NOPERM"):
            call(r, r_url_prefix, "prolog", ctx_for("cms001"), 1)
        call(r, "dynvm", "prolog", ctx_for("cms001"), 0.001)


def test_per_job_acl_user_reaches_only_its_own_job(farm: Farm, hook_url: str) -> None:
    with LightRedis(hook_url) as r:
        mine = call(r, "dynvm", "prolog", ctx_for("cms001", "901"), 60)
        theirs = call(r, "dynvm", "prolog", ctx_for("atlas001", "902"), 60)
    url = user_url(hook_url, mine["job_user"], mine["job_password"])
    with LightRedis(url) as job:
        assert job.hgetall(jobvm_key("dynvm", job_key("t", "901", 0)))["instance"] == mine["instance"]
        assert job.set(f"dynvm:run:{mine['instance']}:0", "x", nx=True)
        forbidden: list[tuple[str | int, ...]] = [
            ("HGETALL", jobvm_key("dynvm", job_key("t", "902", 0))),          # another job's record
            ("SET", f"dynvm:run:{theirs['instance']}:0", "x", "NX"),        # another VM's run token
            ("HGETALL", f"dynvm:inst:{theirs['instance']}"),                 # instance records
            ("LPUSH", "dynvm:hooks", "{}"),                                   # provision / release
            ("DEL", jobvm_key("dynvm", job_key("t", "901", 0))),             # even its own record
            ("KEYS", "*"), ("ACL", "LIST"), ("FLUSHALL",),
        ]
        for cmd in forbidden:
            with pytest.raises(RedisReplyError, match="NOPERM"):
                job.execute(*cmd)
    with LightRedis(hook_url) as hook:  # the trusted hook user itself cannot read or write state either
        for cmd in [("HGETALL", f"dynvm:inst:{mine['instance']}"), ("DEL", "dynvm:insts")]:
            with pytest.raises(RedisReplyError, match="NOPERM"):
                hook.execute(*cmd)
        call(hook, "dynvm", "epilog", ctx_for("cms001", "901"), 30)
        call(hook, "dynvm", "epilog", ctx_for("atlas001", "902"), 30)
    with pytest.raises(RedisReplyError, match="WRONGPASS"):  # epilog removed the job's user
        LightRedis(url)


def test_wnodes_a_job_on_a_dynvm_host_gets_its_vm_there_sized_from_its_request(farm: Farm,
                                                                               hook_url: str) -> None:
    with LightRedis(hook_url) as r:
        for node in ("hv2", "hv3"):
            ctx = ctx_for("lhcb001", cpus=2, memory_mib=512, node=node)
            vm = call(r, "dynvm", "prolog", ctx, 60)
            inst = farm.rt.store.require_instance(vm["instance"])
            assert (inst.host, inst.vcpus, inst.memory_mib) == (node, 2, 512)
            call(r, "dynvm", "epilog", ctx, 30)
        # A node that is not a dynvm host: placed wherever the scheduler chooses.
        ctx = ctx_for("lhcb001", node="wn042")
        vm = call(r, "dynvm", "prolog", ctx, 60)
        assert farm.rt.store.require_instance(vm["instance"]).host in ("hv1", "hv2", "hv3")
        call(r, "dynvm", "epilog", ctx, 30)


def test_the_sweep_forgets_jobs_whose_vm_went_without_an_epilog(farm: Farm, hook_url: str) -> None:
    from batch_hooks.requeue import sweep
    from provisioner.control.client import release

    with LightRedis(hook_url) as r:
        ctx = ctx_for("cms001", "6060")
        vm = call(r, "dynvm", "prolog", ctx, 60)
    release(farm.rt, vm["instance"])  # e.g. an operator; no epilog follows
    wait(farm.rt, vm["instance"], 30, until=ENDED)
    assert sweep(farm.rt, {}) == []
    assert not farm.rt.store.r.exists(jobvm_key("dynvm", ctx.key))
    assert not farm.rt.store.r.sismember(jobvms_key("dynvm"), ctx.key)
    with pytest.raises(RedisReplyError, match="WRONGPASS"):
        LightRedis(user_url(hook_url, vm["job_user"], vm["job_password"]))


def test_a_requeue_that_failed_is_tried_again_never_lost(farm: Farm, hook_url: str) -> None:
    from batch_hooks.requeue import sweep

    class Flaky:  # scontrol failing once (slurmctld restarting), then working
        def __init__(self) -> None:
            self.calls: list[str] = []

        def requeue(self, cluster: str, job_id: str) -> None:
            self.calls.append(job_id)
            if len(self.calls) == 1:
                raise RuntimeError("slurm_requeue error: Unable to contact slurm controller")

    with LightRedis(hook_url) as r:
        ctx = ctx_for("cms001", "7070")
        vm = call(r, "dynvm", "prolog", ctx, 60)
    farm.rt.store.transition(vm["instance"], InstanceState.LOST, reason="test: VM lost under its job")
    flaky = Flaky()
    with pytest.raises(RuntimeError, match="controller"):
        sweep(farm.rt, {"slurm": flaky})
    assert sweep(farm.rt, {"slurm": flaky}) == [ctx.key]  # the mark was given back: requeued now
    assert sweep(farm.rt, {"slurm": flaky}) == []  # and only once
    assert flaky.calls == ["7070", "7070"]


@contextlib.contextmanager
def jobs_with_lost_vms(farm: Farm, hook_url: str, *jobs: str) -> Iterator[dict[str, str]]:
    """Slurm jobs (job id -> job key) whose VMs were lost under them; forgotten on the way out: they exist in
    no Slurm and the farm is shared, so no later sweep may meet them."""
    keys: dict[str, str] = {}
    try:
        with LightRedis(hook_url) as r:
            for job in jobs:
                ctx = ctx_for("cms001", job)
                vm = call(r, "dynvm", "prolog", ctx, 60)
                keys[job] = ctx.key
                lost = "test: VM lost under its job"
                farm.rt.store.transition(vm["instance"], InstanceState.LOST, reason=lost)
        yield keys
    finally:
        prefix = farm.rt.store.keys.prefix
        for key in keys.values():
            farm.rt.store.r.delete(jobvm_key(prefix, key))
            farm.rt.store.r.srem(jobvms_key(prefix), key)


def test_one_failing_requeue_holds_no_other_job_up(farm: Farm, hook_url: str) -> None:
    """A schedd/slurmctld refusing one job's requeue: the others of the same pass are requeued; the failure
    is still raised (the loop records it) and that job keeps no mark, so it is tried again."""
    from batch_hooks.requeue import sweep

    class RefusesOne:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def requeue(self, cluster: str, job_id: str) -> None:
            self.calls.append(job_id)
            if job_id == "8080":
                raise RuntimeError("Invalid job id specified")

    req = RefusesOne()
    with jobs_with_lost_vms(farm, hook_url, "8080", "8081"):
        with pytest.raises(RuntimeError, match="Invalid job id"):
            sweep(farm.rt, {"slurm": req})
        assert sorted(req.calls) == ["8080", "8081"]  # 8081 was not held up behind 8080
        with pytest.raises(RuntimeError, match="Invalid job id"):
            sweep(farm.rt, {"slurm": req})  # 8080 again (no mark kept), 8081 not again (requeued once)
        assert sorted(req.calls) == ["8080", "8080", "8081"]


def test_each_failed_requeue_of_a_pass_is_logged(farm: Farm, hook_url: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Only the first failure of a pass is raised (for the loop's record): the others are logged, not lost."""
    from batch_hooks.requeue import sweep

    class RefusesAll:
        def requeue(self, cluster: str, job_id: str) -> None:
            raise RuntimeError(f"Invalid job id specified: {job_id}")

    caplog.set_level(logging.WARNING, logger="dynvm.hooks.requeue")
    with jobs_with_lost_vms(farm, hook_url, "9190", "9191") as keys:
        with pytest.raises(RuntimeError, match="Invalid job id"):
            sweep(farm.rt, {"slurm": RefusesAll()})
        logged = [r.getMessage() for r in caplog.records if r.name == "dynvm.hooks.requeue"]
        for job in keys:
            assert any(f":{job} failed" in m and f"RuntimeError: Invalid job id specified: {job}" in m
                       for m in logged), logged
