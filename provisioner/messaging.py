"""Messaging between the processes: queue and task names, priorities and the Celery app factory.

Neutral ground: the control workers (provisioner.control), the host agents (provisioner.agent) and the
clients all import this module and never each other.  ``make_app`` registers no task: each process
registers the tasks it serves (``control.tasks.register`` / ``agent.tasks.register``); senders send by name.

The Celery app factory has no module-level app: the config is passed explicitly.

Queues: ``provision`` (control workers: plan and place, never touch libvirt) and ``host.<name>`` (the host's
agent, alone drives its libvirt).  HA starts are sent to the host queue with a higher priority than
provisioning work, so an agent serves them first (kombu's Redis transport pops priority sub-queues in order).
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery

from provisioner.config import Config

PROVISION_QUEUE = "provision"

PROVISION = "dynvm.provision"
BOOT = "dynvm.boot"
RELEASE = "dynvm.release"
MIGRATE = "dynvm.migrate"
INVENTORY = "dynvm.inventory"
PRIORITY_HA = 0  # kombu's Redis transport: lower number = served first
PRIORITY_DEFAULT = 5


def host_queue(host: str) -> str:
    return f"host.{host}"


def _survivable(base: Any) -> Any:
    """A kombu Redis channel class with two fixes for errors Celery treats as unrecoverable (the worker or
    agent exits, with status 0) although they only mean "the broker went away" or "the master moved":
    - when the broker connection drops (Redis killed or restarted, a failover), Celery closes the channel,
      and restoring its unacknowledged messages needs a new pool for a connection kombu has already
      released (``AttributeError: 'NoneType' object has no attribute 'hostname'``);
    - a demoted master answers its blocked BRPOP consumers with ``UNBLOCKED``.
    Both become connection errors: Celery reconnects (to the restarted server, or the new master), and
    unacknowledged messages come back after the visibility timeout."""
    import redis.exceptions

    class Channel(base):  # type: ignore[misc]
        def _connparams(self, asynchronous: bool = False) -> Any:
            if self.connection.client is None:
                raise redis.exceptions.ConnectionError("broker connection already closed")
            return super()._connparams(asynchronous)

        def _brpop_read(self, **options: Any) -> Any:
            # A master demoted by a switchover unblocks its waiting consumers with an UNBLOCKED error,
            # which Celery would also take as unrecoverable: it is a lost connection (go find the master).
            try:
                return super()._brpop_read(**options)
            except redis.exceptions.ResponseError as err:
                if str(err).startswith("UNBLOCKED"):
                    self.client.connection.disconnect()  # as kombu does for a connection error
                    raise redis.exceptions.ConnectionError(str(err)) from None
                raise

    return Channel


@functools.cache
def _sentinel_transport() -> type:
    """kombu's Sentinel transport with the survivable channel (see ``_survivable``)."""
    from kombu.transport.redis import SentinelChannel
    from kombu.transport.redis import SentinelTransport as Base

    class SentinelTransport(Base):
        pass

    SentinelTransport.Channel = _survivable(SentinelChannel)
    return SentinelTransport


@functools.cache
def _redis_transport() -> type:
    """kombu's Redis transport with the survivable channel: without it, an agent with a task in flight when
    Redis was killed exited (status 0) on the reconnect, and nothing re-drove its booting record (issue 7)."""
    from kombu.transport.redis import Channel as RedisChannel
    from kombu.transport.redis import Transport as Base

    class RedisTransport(Base):
        pass

    RedisTransport.Channel = _survivable(RedisChannel)
    return RedisTransport


def __getattr__(name: str) -> Any:
    # Resolved by kombu from the name in ``broker_transport`` (kombu imported only by those who send).
    if name == "SentinelTransport":
        return _sentinel_transport()
    if name == "RedisTransport":
        return _redis_transport()
    raise AttributeError(name)


def make_app(config: Config, name: str = "dynvm") -> Celery:
    from provisioner.redisurl import broker_settings, scheme_of

    # A sentinel:// configuration becomes kombu's Sentinel transport (sentinels + master_name), so the
    # broker follows a Redis failover exactly as the state store does.
    broker, sentinel_options = broker_settings(config.redis_url)
    app = Celery(name, broker=broker, set_as_current=False)
    if sentinel_options:
        app.conf.broker_transport = "provisioner.messaging:SentinelTransport"
    elif scheme_of(config.redis_url) == "redis":  # (rediss: kombu's own, which turns TLS on by its scheme)
        app.conf.broker_transport = "provisioner.messaging:RedisTransport"
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=PROVISION_QUEUE,
        task_default_priority=PRIORITY_DEFAULT,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Above the slowest operation (a boot waiting for readiness), so a slow task is not
            # redelivered while it still runs.  A killed agent's tasks come back after this; the agent's
            # start-up reconciliation re-drives its placed/booting instances long before that.
            "visibility_timeout": int(config.timeouts.visibility_s),
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
            **sentinel_options,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app


def send(app: Celery, task: str, args: list[Any], queue: str, priority: int = PRIORITY_DEFAULT) -> None:
    app.send_task(task, args=args, queue=queue, priority=priority)
