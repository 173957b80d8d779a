"""The control workers' Celery task: plan and place.  Thin: takes an id, re-reads state, delegates."""

from __future__ import annotations

from typing import Any

from provisioner.messaging import PROVISION
from provisioner.tasking import RETRY, runtime_of


def register(app: Any) -> None:
    @app.task(name=PROVISION, shared=False, bind=True, **RETRY)  # type: ignore[untyped-decorator]
    def provision(self: Any, instance_id: str) -> None:
        from provisioner.control.place import place_instance

        rt = runtime_of(self)
        # Marked picked (the sweeper re-sends only what no worker is on) and read, in one round trip.
        inst = rt.store.pick_up(instance_id)
        place_instance(rt, instance_id, final_attempt=self.request.retries >= self.max_retries, inst=inst)
