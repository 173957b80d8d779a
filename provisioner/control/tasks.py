"""Thin Celery tasks: take ids, re-read state, delegate.  Retries only for transient errors."""

from __future__ import annotations

import logging
from typing import Any

from provisioner.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

PROVISION = "dynvm.provision"
BOOT = "dynvm.boot"
RELEASE = "dynvm.release"
MIGRATE = "dynvm.migrate"
INVENTORY = "dynvm.inventory"
EXEC = "dynvm.exec"


def _runtime(task: Any) -> Any:
    rt = getattr(task.app, "dynvm_runtime", None)
    if rt is None:
        raise RuntimeError("this process has no dynvm runtime attached to its Celery app")
    return rt


def register(app: Any) -> None:
    retry = {
        "autoretry_for": (TransientError,),
        "retry_backoff": 0.5,
        "retry_backoff_max": 10,
        "retry_jitter": True,
        "max_retries": 3,
        "dont_autoretry_for": (PermanentError,),
    }

    @app.task(name=PROVISION, shared=False, bind=True, **retry)  # type: ignore[untyped-decorator]
    def provision(self: Any, instance_id: str) -> None:
        from provisioner.control.place import place_instance

        place_instance(_runtime(self), instance_id, final_attempt=self.request.retries >= self.max_retries)

    @app.task(name=BOOT, shared=False, bind=True, **retry)  # type: ignore[untyped-decorator]
    def boot(self: Any, instance_id: str) -> None:
        from provisioner.agent.lifecycle import boot_instance

        boot_instance(_runtime(self), instance_id, final_attempt=self.request.retries >= self.max_retries)

    @app.task(name=RELEASE, shared=False, bind=True, **retry)  # type: ignore[untyped-decorator]
    def release(self: Any, instance_id: str) -> None:
        from provisioner.agent.lifecycle import release_instance

        release_instance(_runtime(self), instance_id)

    @app.task(name=MIGRATE, shared=False, bind=True, **retry)  # type: ignore[untyped-decorator]
    def migrate(self: Any, instance_id: str, dest: str) -> None:
        from provisioner.agent.migrate import migrate_instance

        migrate_instance(_runtime(self), instance_id, dest)

    @app.task(name=INVENTORY, shared=False, bind=True)  # type: ignore[untyped-decorator]
    def inventory(self: Any, request_id: str) -> None:
        from provisioner.control.inventory import answer_inventory

        answer_inventory(_runtime(self), request_id)

    @app.task(name=EXEC, shared=False, bind=True)  # type: ignore[untyped-decorator]
    def exec_(self: Any, request_id: str, instance_id: str, argv: list[str], timeout_s: float) -> None:
        from provisioner.control.execjob import answer_exec

        answer_exec(_runtime(self), request_id, instance_id, argv, timeout_s)
