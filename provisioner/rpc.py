"""Request/reply with one host's agent over its queue (inventory, exec).

The request goes through ``host.NAME`` at HA priority; the agent pushes a JSON answer to a short-lived
Redis list and the caller BLPOPs it with a deadline.  Errors cross as ``{"error": code, "message": ...}``.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from provisioner.errors import DeadlineExceeded, DynvmError, PermanentError, TransientError
from provisioner.runtime import Runtime
from provisioner.state.base import MAX_BLOCK_S

REPLY_TTL_S = 120


def reply_key(rt: Runtime, request_id: str) -> str:
    from provisioner.state.keys import check_id

    return f"{rt.store.keys.prefix}:reply:{check_id(request_id, 'request id')}"


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


def call_agent(rt: Runtime, host: str, task: str, args: list[Any], timeout_s: float) -> dict[str, Any]:
    from provisioner.messaging import PRIORITY_HA, host_queue

    rt.store.require_host(host)
    request_id = secrets.token_hex(8)
    rt.app.send_task(task, args=[request_id, *args], queue=host_queue(host), priority=PRIORITY_HA)
    got = None
    deadline = time.monotonic() + timeout_s
    while got is None and (left := deadline - time.monotonic()) > 0:
        # Block in slices shorter than the client's socket timeout (a long BLPOP would trip it).
        got = rt.store.r.blpop([reply_key(rt, request_id)], timeout=max(0.01, min(left, MAX_BLOCK_S)))
    if got is None:
        raise DeadlineExceeded(f"host {host}: its agent did not answer in {timeout_s:.0f} s")
    answer: dict[str, Any] = json.loads(got[1])
    if "error" in answer:
        cls = TransientError if answer.get("transient") else PermanentError
        raise cls(str(answer.get("message", "agent error")))
    return answer
