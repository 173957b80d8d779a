"""Request/reply with one host's agent over its queue (inventory).

The request goes through ``host.NAME`` at HA priority; the agent pushes a JSON answer to a short-lived
Redis list and the caller BLPOPs it with a deadline.  Errors cross as ``{"error": code, "message": ...}``.

Requests carry an expiry: before sending, the caller writes ``PREFIX:req:ID`` with a TTL equal to its
deadline (Redis's clock, so no clock skew between machines).  The agent takes that key with one DEL
before it acts: gone means the caller has given up (an agent that was down or busy comes back to a queue
of stale requests) or another delivery of the same message took it, and the request is dropped with a log
line, never replayed.  Whatever a handler raises becomes an error reply: the caller never waits out its
deadline because of an agent-side bug.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from provisioner.errors import DeadlineExceeded, DynvmError, PermanentError, TransientError
from provisioner.runtime import Runtime
from provisioner.state.base import MAX_BLOCK_S

log = logging.getLogger(__name__)
REPLY_TTL_S = 120


def reply_key(rt: Runtime, request_id: str) -> str:
    from provisioner.state.keys import check_id

    return f"{rt.store.keys.prefix}:reply:{check_id(request_id, 'request id')}"


def request_key(rt: Runtime, request_id: str) -> str:
    """Exists while the caller still waits for the answer (its TTL is the request's expiry)."""
    from provisioner.state.keys import check_id

    return f"{rt.store.keys.prefix}:req:{check_id(request_id, 'request id')}"


def reply(rt: Runtime, request_id: str, payload: dict[str, Any]) -> None:
    key = reply_key(rt, request_id)
    pipe = rt.store.r.pipeline(transaction=False)
    pipe.rpush(key, json.dumps(payload))
    pipe.expire(key, REPLY_TTL_S)
    pipe.execute()


def reply_error(rt: Runtime, request_id: str, err: DynvmError) -> None:
    reply(
        rt, request_id, {"error": err.code, "transient": isinstance(err, TransientError), "message": str(err)}
    )


def serve_request(
    rt: Runtime, request_id: str, what: str, handler: Callable[..., dict[str, Any]], *args: Any
) -> None:
    """Agent side: answer one request with ``handler(*args)``, unless it expired; never silently fail."""
    if not rt.store.r.delete(request_key(rt, request_id)):
        log.warning("dropping %s request %s: expired (its caller gave up) or already taken", what, request_id)
        return
    try:
        payload = handler(*args)
    except DynvmError as err:
        reply_error(rt, request_id, err)
        return
    except Exception as err:  # an agent bug must reach the caller as an error, not as its deadline
        log.exception("%s request %s failed unexpectedly", what, request_id)
        detail = str(err).splitlines()[0][:300] if str(err) else ""
        payload = {
            "error": "internal",
            "transient": False,
            "message": f"agent on {rt.host}: {what} failed: {type(err).__name__}: {detail}".rstrip(": "),
        }
    reply(rt, request_id, payload)


def call_agent(rt: Runtime, host: str, task: str, args: list[Any], timeout_s: float) -> dict[str, Any]:
    from provisioner.messaging import PRIORITY_HA, host_queue

    rt.store.require_host(host)
    request_id = secrets.token_hex(8)
    pending = request_key(rt, request_id)
    rt.store.r.set(pending, "1", px=max(1, int(timeout_s * 1000)))
    rt.app.send_task(task, args=[request_id, *args], queue=host_queue(host), priority=PRIORITY_HA)
    got = None
    deadline = time.monotonic() + timeout_s
    while got is None and (left := deadline - time.monotonic()) > 0:
        # Block in slices shorter than the client's socket timeout (a long BLPOP would trip it).
        got = rt.store.r.blpop([reply_key(rt, request_id)], timeout=max(0.01, min(left, MAX_BLOCK_S)))
    if got is None:
        rt.store.r.delete(pending)  # withdrawn: an agent that gets to it later drops it
        raise DeadlineExceeded(f"host {host}: its agent did not answer in {timeout_s:.0f} s")
    answer: dict[str, Any] = json.loads(got[1])
    if "error" in answer:
        cls = TransientError if answer.get("transient") else PermanentError
        raise cls(str(answer.get("message", "agent error")))
    return answer
