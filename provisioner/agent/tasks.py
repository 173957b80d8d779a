"""The host agent's Celery tasks (queue ``host.NAME``).  Thin: take ids, re-read state, delegate."""

from __future__ import annotations

import logging
from typing import Any

from provisioner.errors import TransientError
from provisioner.messaging import BOOT, INVENTORY, MIGRATE, RELEASE
from provisioner.tasking import AGENT_RETRY, retry_or_note, runtime_of

log = logging.getLogger(__name__)


def register(app: Any) -> None:
    @app.task(name=BOOT, shared=False, bind=True, **AGENT_RETRY)  # type: ignore[untyped-decorator]
    def boot(self: Any, instance_id: str) -> None:
        from provisioner.agent.lifecycle import boot_instance

        rt = runtime_of(self)
        try:
            boot_instance(rt, instance_id, final_attempt=self.request.retries >= self.max_retries)
        except TransientError as exc:
            retry_or_note(self, exc, lambda: note_lost_retry(rt, instance_id))

    @app.task(name=RELEASE, shared=False, bind=True, **AGENT_RETRY)  # type: ignore[untyped-decorator]
    def release(self: Any, instance_id: str) -> None:
        from provisioner.agent.lifecycle import release_instance

        rt = runtime_of(self)
        try:
            release_instance(rt, instance_id)
        except TransientError as exc:
            retry_or_note(self, exc, lambda: note_lost_retry(rt, instance_id))

    @app.task(name=MIGRATE, shared=False, bind=True, **AGENT_RETRY)  # type: ignore[untyped-decorator]
    def migrate(self: Any, instance_id: str, dest: str, epoch: int | None = None) -> None:
        from provisioner.agent.migrate import migrate_instance

        rt = runtime_of(self)
        try:
            migrate_instance(rt, instance_id, dest, expected_epoch=epoch)
        except TransientError as exc:  # a lost retry: the reconciler settles the move at its next pass
            retry_or_note(self, exc, lambda: note_lost_retry(rt, instance_id))

    @app.task(name=INVENTORY, shared=False, bind=True)  # type: ignore[untyped-decorator]
    def inventory(self: Any, request_id: str, *args: Any) -> None:
        from provisioner.agent.answers import answer_inventory

        # Arguments pass through to the handler: a mismatch (client and agent of different versions)
        # becomes an error reply there instead of a TypeError here that leaves the caller waiting.
        answer_inventory(runtime_of(self), request_id, *args)


def note_lost_retry(rt: Any, instance_id: str) -> None:
    """The broker refused this instance's retry: the reconciler re-drives it (boot, release) or settles it
    (a move) at its next pass, instead of after the grace."""
    with rt.lock:
        rt.lost_retries.add(instance_id)
    log.warning(
        "agent %s: the retry of %s could not be queued (broker down): re-driven by the next reconcile pass",
        rt.host, instance_id)
