"""What every dynvm Celery task shares: the retry policy and the runtime attached to the app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

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


# The host agent's boot, release and migrate: the same policy, applied by the task itself (retry_or_note)
# instead of by Celery's autoretry, so that a retry the broker refuses is not silently gone.
AGENT_RETRY: dict[str, Any] = {"max_retries": RETRY["max_retries"]}


def retry_or_note(task: Any, exc: TransientError, lost: Callable[[], None]) -> NoReturn:
    """Retry ``task`` as the shared policy would (jittered exponential back-off, at most ``max_retries``).

    When the broker cannot take the retry (Redis down), Celery rejects the message without requeueing it:
    the operation would be gone, and only the reconciler's grace (``timeouts.provision_s``) would bring it
    back.  ``lost()`` is called first, so the agent can re-drive it as soon as Redis answers again."""
    from celery.exceptions import Reject
    from celery.utils.time import get_exponential_backoff_interval

    countdown = get_exponential_backoff_interval(  # as Celery's autoretry computes it (an integer factor)
        factor=int(max(1.0, RETRY["retry_backoff"])), retries=task.request.retries,
        maximum=RETRY["retry_backoff_max"], full_jitter=RETRY["retry_jitter"],
    )
    try:
        raise task.retry(exc=exc, countdown=countdown)
    except Reject:
        lost()
        raise
