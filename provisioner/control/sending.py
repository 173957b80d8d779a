"""Sending control messages: a broker that cannot take one is UnavailableError (one line), never kombu's
OperationalError or a redis-py error.  Used by the clients and the control workers' sweeper."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from provisioner.errors import UnavailableError
from provisioner.runtime import Runtime


@contextlib.contextmanager
def redis_unavailable(rt: Runtime) -> Iterator[None]:
    """Redis or broker errors raised by code that talks to Redis directly become UnavailableError."""
    import kombu.exceptions
    import redis.exceptions

    from provisioner.redisurl import redact

    try:
        yield
    except (
        kombu.exceptions.KombuError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.ReadOnlyError,
        OSError,
    ) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UnavailableError(
            f"redis/broker at {redact(rt.config.redis_url)} unavailable: {detail}"
        ) from None


def send_message(rt: Runtime, task: str, args: list[Any], queue: str, priority: int | None = None) -> None:
    """Send one Celery message; a broker that cannot take it is UnavailableError (one line naming the
    redacted URL), never kombu's OperationalError or a redis-py error."""
    with redis_unavailable(rt):
        if priority is None:
            rt.app.send_task(task, args=args, queue=queue)
        else:
            rt.app.send_task(task, args=args, queue=queue, priority=priority)


def send_provision(rt: Runtime, instance_id: str) -> None:
    from provisioner.messaging import PROVISION, PROVISION_QUEUE

    send_message(rt, PROVISION, [instance_id], PROVISION_QUEUE)


def send_boot(rt: Runtime, instance_id: str, host: str, ha: bool = False) -> None:
    from provisioner.messaging import BOOT, PRIORITY_DEFAULT, PRIORITY_HA, host_queue

    send_message(rt, BOOT, [instance_id], host_queue(host), PRIORITY_HA if ha else PRIORITY_DEFAULT)
