"""A record left ``migrating`` with no request to finish it (the agent died between claiming the
destination and moving the guest, and the MIGRATE message is gone too): the source's reconciler settles
it once it is older than the grace.  Real `dynvm agent` / `dynvm worker` processes on libvirt's test
driver; the moves that really happened are settled on the QEMU farm (tests/qemu_e2e/test_qemu_farm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.control.client import choose_image, submit
from provisioner.model import InstanceState
from provisioner.runtime import claim
from tests.conftest import wait_until
from tests.control.ministack import mini_stack, stack_config

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
S = InstanceState
GRACE_S = 3.0
INTERVAL_S = 0.5


def test_a_move_left_migrating_is_undone_by_the_sources_reconciler(tmp_path: Path, redis_url: str) -> None:
    cfg = stack_config(tmp_path, redis_url, ["hv1", "hv2"], cpus=8)
    cfg["timeouts"] = {"reconcile_interval_s": INTERVAL_S, "provision_s": GRACE_S}
    with mini_stack(tmp_path / "stack", cfg, workers=1) as st:
        rt = st.rt
        image, vo = choose_image(rt, None, "cms")
        inst, _ = submit(rt, image, vo, owner="job-1")
        wait_until(lambda: rt.store.require_instance(inst.id).state is S.READY, 30, 0.1, "ready")
        ready = rt.store.require_instance(inst.id)
        assert ready.host is not None
        src, dest = ready.host, ("hv2" if ready.host == "hv1" else "hv1")
        moving = rt.store.transition_from(ready, S.MIGRATING)  # what the agent did before it died
        assert claim(rt, dest, moving)
        wait_until(lambda: rt.store.require_instance(inst.id).state is S.READY,
                   GRACE_S + 10 * INTERVAL_S + 10, 0.2, "the unfinished move to be undone")
        back = rt.store.require_instance(inst.id)
        assert (back.host, back.epoch) == (src, moving.epoch)  # where it always ran, the same placement
        assert inst.id not in rt.store.claims_on(dest) and inst.id in rt.store.claims_on(src)
        events = [(e.kind, e.message) for e in rt.store.read_events(count=500) if e.instance == inst.id]
        reverted = [m for k, m in events if k == "migration_reverted"]
        assert len(reverted) == 1 and "here running" in reverted[0], events
