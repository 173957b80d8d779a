"""What every dynvm Celery task shares: the retry policy and the runtime attached to the app."""

from __future__ import annotations

from typing import Any

from provisioner.errors import PermanentError, TransientError

# Shared by every dynvm task: retry transient errors only, with jittered back-off.
RETRY: dict[str, Any] = {
    "autoretry_for": (TransientError,),
    "retry_backoff": 0.5,
    "retry_backoff_max": 10,
    "retry_jitter": True,
    "max_retries": 3,
    "dont_autoretry_for": (PermanentError,),
}


def runtime_of(task: Any) -> Any:
    rt = getattr(task.app, "dynvm_runtime", None)
    if rt is None:
        raise RuntimeError("this process has no dynvm runtime attached to its Celery app")
    return rt
