"""The trusted side of the hooks: serve ``<prefix>:hooks`` requests (runs in a control worker or
``dynvm hook serve``; holds the full runtime, so the hook processes do not have to).

prolog  = trusted identity (uid -> pool account group -> VO; never a job's comment, constraint, typed
          account or self-set attribute) -> the VO's image -> provision with the job attempt's idempotency
          key -> wait with the request's deadline -> record the VM for the job + a per-job Redis ACL user.
epilog  = release the job's VM (worker VMs are single-use), drop the record and the ACL user.  Idempotent.

A prolog that fails after submitting releases what it submitted, so a requeued attempt starts clean.
Every request is answered (an unexpected exception becomes an error reply, never a silent timeout); the
serving loop survives any exception and logs it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from batch_hooks.context import JobContext
from batch_hooks.proto import (
    CONDOR_OPS,
    MAX_REQUEST_BYTES,
    REPLY_TTL_S,
    condor_hooks_key,
    hooks_key,
    job_acl_user,
    jobvm_key,
    jobvms_key,
    reply_key,
)
from provisioner.errors import (
    DynvmError,
    TransientError,
    UnavailableError,
    ValidationError,
)
from provisioner.model import Instance, InstanceState
from provisioner.runtime import Runtime

if TYPE_CHECKING:
    from batch_hooks.condor_verify import ScheddLookup

log = logging.getLogger("dynvm.hooks")
MAX_WAIT_S = 3600.0
REQUEST_ID_CHARS = frozenset("0123456789abcdef")


def job_user_rules(prefix: str, job_key: str, instance_id: str, attempt: int, password: str) -> list[str]:
    """ACL rules of a job's own Redis user: read its VM record, take its VM's run token; nothing else."""
    return ["reset", "on", f">{password}", f"~{jobvm_key(prefix, job_key)}",
            f"~{prefix}:run:{instance_id}:{attempt}", "-@all", "+hgetall", "+set", "+ping", "+auth"]


def vo_of(rt: Runtime, ctx: JobContext, proxy_vo: str | None = None) -> str:
    """The job's VO from trusted identity only: the uid's pool account and its group on this machine (or
    the proxy VO the schedd recorded, where the site configures that source)."""
    from provisioner.identity import JobIdentity, resolve_vo

    identity = JobIdentity.from_uid(ctx.uid, condor_proxy_vo=proxy_vo)
    if identity.user != ctx.user:
        raise ValidationError(f"uid {ctx.uid} is {identity.user!r} here, not {ctx.user!r}")
    return resolve_vo(identity, rt.config)


def _size(value: int | None, lo: int, default: int, hi: int, what: str) -> int:
    if value is None:
        return default
    if value > hi:
        raise ValidationError(f"the job asks for {value} {what}; its VO's image allows at most {hi}")
    return max(lo, value)


def prolog(rt: Runtime, ctx: JobContext, deadline: float, proxy_vo: str | None = None) -> dict[str, Any]:
    from batch_hooks.poolstate import take_warm_for_job
    from provisioner.control.client import release, submit, wait
    from provisioner.identity import image_for_vo
    from provisioner.limits import enforce_for_job

    vo = vo_of(rt, ctx, proxy_vo)
    image = image_for_vo(vo, rt.catalogue, rt.config)
    spec = image.spec
    vcpus = _size(ctx.cpus, spec.vcpus.min, spec.vcpus.default, spec.vcpus.max, "cpus")
    memory = _size(ctx.memory_mib, spec.memory_mib.min, spec.memory_mib.default, spec.memory_mib.max, "MiB")
    # WNoDeS: a job started on a node that is itself a dynvm host gets its VM there.
    host = ctx.node if ctx.node and rt.store.get_host(ctx.node) is not None else None
    # -- issue 9 (warm pools, per-VO limits): a ready warm VM of the job's VO if there is one, else the
    # VO's limits decide (wait: transient, the job is requeued; fail: permanent, held with the reason).
    warm = None if host else take_warm_for_job(rt, vo, image.ref, ctx.owner, ctx.key, vcpus, memory)
    if warm is not None:
        return _record(rt, ctx, warm, vo)
    enforce_for_job(rt, vo, ctx.key, vcpus)
    # -- end issue 9
    inst, _ = submit(rt, image, vo, owner=ctx.owner, idempotency_key=ctx.key,
                     vcpus=vcpus, memory_mib=memory, host=host)
    try:
        done = wait(rt, inst.id, max(0.0, deadline - time.monotonic()))
        if done.state is not InstanceState.READY:
            raise TransientError(f"vm {inst.id} for job {ctx.job_id} {done.state.value}: {done.reason}"[:300])
        return _record(rt, ctx, done, vo)
    except DynvmError:
        release(rt, inst.id)  # single-use: the next attempt gets a fresh VM, none is left behind
        raise


def _record(rt: Runtime, ctx: JobContext, inst: Instance, vo: str) -> dict[str, Any]:
    prefix = rt.store.keys.prefix
    password = secrets.token_hex(16)
    user = job_acl_user(prefix, ctx.key)
    fields: dict[Any, Any] = {"instance": inst.id, "host": inst.host or "", "vo": vo, "image": inst.image,
              "uid": str(ctx.uid), "attempt": str(ctx.attempt),
              "shared_dir": str(rt.config.storage.shared_dir),
              "batch": ctx.batch, "cluster": ctx.cluster, "job_id": ctx.job_id}
    pipe = rt.store.r.pipeline(transaction=True)
    pipe.hset(jobvm_key(prefix, ctx.key), mapping=fields)
    pipe.sadd(jobvms_key(prefix), ctx.key)  # the lost-VM sweep walks this (batch_hooks.requeue)
    pipe.execute()
    rules = job_user_rules(prefix, ctx.key, inst.id, ctx.attempt, password)
    rt.store.r.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]
    _grant_exec(rt, ctx, inst)
    rt.store.add_event("job_vm", instance=inst.id, message=f"{ctx.owner} attempt {ctx.attempt} vo={vo}")
    return {**fields, "job_user": user, "job_password": password}


def _grant_exec(rt: Runtime, ctx: JobContext, inst: Instance) -> None:
    """Let the job's own uid reach its own VM's exec channel (and no other): the payload wrapper runs
    with the job's privileges.  Only where the socket is visible from here (WNoDeS: the job's node)."""
    from provisioner.execchan.client import exec_socket

    if inst.host is None or os.geteuid() != 0:
        return
    path = exec_socket(rt.config.storage.shared_dir, inst.id, inst.host)
    try:
        os.chown(path, ctx.uid, ctx.gid)
        os.chmod(path, 0o600)
    except FileNotFoundError:
        pass  # an image without a serial channel, or the VM's host is another machine


def epilog(rt: Runtime, ctx: JobContext) -> dict[str, Any]:
    from provisioner.control.client import release

    prefix = rt.store.keys.prefix
    raw = rt.store.r.hget(jobvm_key(prefix, ctx.key), "instance")
    iid = (raw.decode() if isinstance(raw, bytes) else raw) or None
    if iid is None:  # the prolog may have died between submit and record
        inst = rt.store.instance_for_key(ctx.key)
        iid = inst.id if inst is not None else None
    if iid is not None and rt.store.get_instance(iid) is not None:
        release(rt, iid)
    rt.store.r.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "DELUSER", job_acl_user(prefix, ctx.key)
    )
    rt.store.r.delete(jobvm_key(prefix, ctx.key))
    rt.store.r.srem(jobvms_key(prefix), ctx.key)
    if iid is not None:
        rt.store.add_event("job_end", instance=iid, message=f"{ctx.owner} attempt {ctx.attempt}")
    return {"instance": iid or "", "released": iid is not None}


# JobStatus per the schedd: 1 idle, 2 running, 3 removed, 4 completed, 5 held, 6 transferring output,
# 7 suspended.  Running, transferring and suspended mean the attempt may still be using its VM.
_CONDOR_ACTIVE = frozenset({2, 6, 7})


def _attempt_over(ad: Any, ctx: JobContext) -> bool:
    """Whether the schedd's copy shows the attempt ``ctx`` names as finished (or superseded)."""
    starts = ad.get("NumJobStarts")
    if isinstance(starts, int) and starts > ctx.attempt:
        return True
    status = ad.get("JobStatus")
    return isinstance(status, int) and status not in _CONDOR_ACTIVE


def serve_condor(rt: Runtime, body: dict[str, Any], ctx: JobContext, deadline: float,
                 lookup: ScheddLookup) -> dict[str, Any]:
    """Check the starter hook's claims against the schedd's copy, then provision or release.

    The owner must be the schedd's; the VO follows from it (and from the schedd's proxy VO, where
    configured), never from an attribute the job set.  No per-job credential goes back: the caller is
    not authenticated beyond being some job's starter hook (payload wrapping for HTCondor is not built)."""
    from provisioner.errors import NotFoundError

    global_id = body.get("global_id")
    if not isinstance(global_id, str) or len(global_id) > 200:
        raise ValidationError("condor request: malformed global_id")
    ad = lookup.job(ctx.cluster, global_id)
    if ad is None:
        raise NotFoundError(f"htcondor: the schedd has no job {global_id[:80]!r}")
    owner = ad.get("Owner")
    if owner != ctx.user:
        raise ValidationError(f"htcondor: job {global_id[:80]!r} belongs to {str(owner)[:32]!r} per the "
                              f"schedd, not {ctx.user!r} as its hook claims")
    if body.get("op") == "condor_exit":
        if not _attempt_over(ad, ctx):
            # The hook is unauthenticated: any job's starter could name this job.  A VM is released only
            # once the schedd itself shows this attempt over; otherwise the leak reclaimer, which asks the
            # schedd each cycle, releases it when it is.
            rt.store.add_event("job_exit_deferred", message=f"{ctx.owner}: the schedd still runs it")
            return {"instance": "", "released": False, "deferred": True}
        return epilog(rt, ctx)
    proxy_vo = ad.get("x509UserProxyVOName")
    vm = prolog(rt, ctx, deadline, proxy_vo if isinstance(proxy_vo, str) else None)
    return {k: v for k, v in vm.items() if k not in ("job_user", "job_password")}


def handle(
    rt: Runtime, raw: bytes, now: float, untrusted: bool = False, lookup: ScheddLookup | None = None
) -> tuple[str | None, dict[str, Any]]:
    """(reply id, answer) for one raw request; ``now`` is Redis's clock.  Never raises.  ``untrusted``:
    it came from the HTCondor starter hooks' list, where only condor operations, checked against the
    schedd through ``lookup``, are served."""
    request_id: str | None = None
    try:
        if len(raw) > MAX_REQUEST_BYTES:
            raise ValidationError(f"hook request longer than {MAX_REQUEST_BYTES} bytes")
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValidationError("hook request: expected an object")
        rid = body.get("reply")
        if isinstance(rid, str) and len(rid) == 32 and set(rid) <= REQUEST_ID_CHARS:
            request_id = rid
        else:
            raise ValidationError("hook request: malformed reply id")
        expires = body.get("expires")
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise ValidationError("hook request: no expiry")
        if expires <= now:
            return None, {}  # nobody waits for it any more: a late daemon must not act on it
        ctx = JobContext.from_dict(body.get("ctx"))
        deadline = time.monotonic() + min(expires - now, MAX_WAIT_S) - 0.5
        if untrusted or body.get("op") in CONDOR_OPS:
            from batch_hooks.condor_verify import Htcondor2Schedd

            if not untrusted or body.get("op") not in CONDOR_OPS:
                op = str(body.get("op"))[:32]
                raise ValidationError(f"hook request: {op!r} is not served on this list")
            return request_id, serve_condor(rt, body, ctx, deadline, lookup or Htcondor2Schedd())
        if body.get("op") == "prolog":
            return request_id, prolog(rt, ctx, deadline)
        if body.get("op") == "epilog":
            return request_id, epilog(rt, ctx)
        raise ValidationError(f"hook request: unknown operation {str(body.get('op'))[:32]!r}")
    except DynvmError as err:
        # No capacity is transient too: the job is requeued and tries again later.
        return request_id, {"error": err.code, "transient": isinstance(err, TransientError),
                            "message": str(err)}
    except ValueError as err:  # bad JSON
        return request_id, {"error": "invalid", "transient": False, "message": f"hook request: {err}"[:200]}
    except Exception as err:  # a bug: answer anyway, as a transient error (the job is requeued, not lost)
        log.exception("hook request failed")
        return request_id, {"error": "internal", "transient": True, "message": f"internal error: {err}"[:200]}


def _answer(rt: Runtime, raw: bytes, now: float, untrusted: bool, lookup: ScheddLookup) -> None:
    request_id, answer = handle(rt, raw, now, untrusted, lookup)
    if request_id is None or not answer:
        return
    key = reply_key(rt.store.keys.prefix, request_id)
    pipe = rt.store.r.pipeline(transaction=False)
    pipe.rpush(key, json.dumps(answer))
    pipe.expire(key, REPLY_TTL_S)
    pipe.execute()


def serve(rt: Runtime, stop: threading.Event, workers: int = 256,
          on_error: Callable[[BaseException], None] | None = None) -> None:
    """Serve requests until ``stop`` is set.  Prologs wait for boots, so they run in a thread pool; the
    loop itself only pops.  Any exception is logged (and counted by ``on_error``) and the loop goes on."""
    from batch_hooks.condor_verify import Htcondor2Schedd

    key, condor_key = hooks_key(rt.store.keys.prefix), condor_hooks_key(rt.store.keys.prefix)
    lookup = Htcondor2Schedd()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hook") as pool:
        while not stop.is_set():
            try:
                got = rt.store.r.brpop([key, condor_key], timeout=1)
                if got is None:
                    continue
                secs, _us = rt.store.r.time()
                body = got[1] if isinstance(got[1], bytes) else got[1].encode()
                pool.submit(_answer, rt, body, float(secs), got[0] == condor_key, lookup)
            except Exception as exc:
                log.exception("hook loop: %s", exc)
                if on_error is not None:
                    on_error(exc)
                stop.wait(0.5 if not isinstance(exc, UnavailableError) else 1.0)


def start_thread(rt: Runtime) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(rt, stop), name="dynvm-hooks", daemon=True)
    t.start()
    return t, stop
