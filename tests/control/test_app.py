"""The Celery app factory's promises, checked on the real Redis broker."""

from __future__ import annotations

import pytest

from provisioner.config import Config
from provisioner.messaging import PRIORITY_DEFAULT, PRIORITY_HA, host_queue, make_app

pytestmark = pytest.mark.redis


def test_ha_work_is_served_before_provisioning_work(redis_url: str) -> None:
    app = make_app(Config(redis_url=redis_url))
    q = host_queue("hvprio")
    for i in range(3):
        app.send_task("dynvm.boot", args=[f"normal{i}"], queue=q, priority=PRIORITY_DEFAULT)
    app.send_task("dynvm.boot", args=["ha0"], queue=q, priority=PRIORITY_HA)
    app.send_task("dynvm.boot", args=["normal3"], queue=q, priority=PRIORITY_DEFAULT)
    order = []
    with app.connection_for_read() as conn:
        sq = conn.SimpleQueue(q, no_ack=True)
        for _ in range(5):
            msg = sq.get(timeout=5)
            order.append(msg.payload[0][0] if isinstance(msg.payload, list) else msg.headers["argsrepr"])
        sq.close()
    assert order[0] == "ha0", order
    assert order[1:] == ["normal0", "normal1", "normal2", "normal3"], order


def test_reliability_settings() -> None:
    app = make_app(Config(redis_url="redis://127.0.0.1:1/0"))
    c = app.conf
    assert c.task_acks_late and c.task_reject_on_worker_lost
    assert c.worker_prefetch_multiplier == 1
    assert c.broker_transport_options["visibility_timeout"] >= Config().timeouts.provision_s
    # Each process registers what it serves; a sender (client) registers nothing.
    assert not {"dynvm.provision", "dynvm.boot"} & set(app.tasks)
    from provisioner.agent import tasks as agent_tasks
    from provisioner.control import tasks as control_tasks

    control_tasks.register(app)
    assert "dynvm.provision" in app.tasks and "dynvm.boot" not in app.tasks
    agent_app = make_app(Config(redis_url="redis://127.0.0.1:1/0"))
    agent_tasks.register(agent_app)
    assert {"dynvm.boot", "dynvm.release", "dynvm.migrate", "dynvm.inventory"} <= set(agent_app.tasks)
    assert "dynvm.exec" not in agent_app.tasks  # payloads never travel as tasks (streamed to the VM)
