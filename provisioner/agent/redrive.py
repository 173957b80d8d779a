"""The reconciler's re-drives: work that nobody else will finish (provisioner.agent.reconcile decides).

A boot or a release found unfinished (at agent start-up, past the grace, or at once when the broker
refused this agent's own retry of it: provisioner.tasking) is run again; both are idempotent.  A move
left migrating is settled from where libvirt says the guest runs (provisioner.agent.migrate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from provisioner.errors import UnavailableError
from provisioner.model import Instance
from provisioner.runtime import Runtime

# action -> (event kind, event text); a settled move records what it found itself (migration_reverted,
# migration_settled, lost) and nothing while its move still runs in this agent (a long migration).
WHAT = {
    "redrive_boot": ("redrive", "re-driving an unfinished boot"),
    "redrive_release": ("redrive_release", "re-driving an unfinished release"),
}


def redrive(rt: Runtime, action: str, rec: Instance) -> None:
    """Carry out one re-drive decided on ``rec`` (the record as the reconciler read it)."""
    from provisioner.agent.lifecycle import boot_instance, release_instance
    from provisioner.agent.migrate import settle_stalled

    if action in WHAT:
        kind, text = WHAT[action]
        rt.store.add_event(kind, instance=rec.id, host=rt.host, message=text)
    with again_if_redis_is_down(rt, rec.id):
        if action == "redrive_boot":
            boot_instance(rt, rec.id, expected_epoch=rec.epoch)
        elif action == "redrive_release":
            release_instance(rt, rec.id)
        else:
            settle_stalled(rt, rec)


@contextlib.contextmanager
def again_if_redis_is_down(rt: Runtime, instance_id: str) -> Iterator[None]:
    """A re-drive that meets Redis down again is noted for the next pass (as its lost retry was); any other
    failure leaves it to the grace, so a boot that keeps failing is not re-driven on every pass."""
    try:
        yield
    except UnavailableError:
        with rt.lock:
            rt.lost_retries.add(instance_id)
        raise
