"""Ended records leave the hot indexes, keep a compact history and expire after the retention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from provisioner.model import Instance, InstanceState, Role, Tier
from provisioner.state import StateStore

pytestmark = pytest.mark.redis
S = InstanceState


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    return StateStore.from_url(redis_url)


def _make(store: StateStore, iid: str, end: InstanceState | None, role: Role = Role.WORKER) -> Instance:
    inst, _ = store.create_instance(
        Instance(
            id=iid,
            role=role,
            image="cms-wn:1",
            vcpus=1,
            memory_mib=512,
            vo="cms",
            owner=f"job-{iid}",
            tier=Tier.WORKER if role is Role.WORKER else Tier.NORMAL,
        ),
        idempotency_key=f"k-{iid}",
    )
    inst = store.transition_from(inst, S.PLACED, bump_epoch=True, host="hv1")
    if end is S.GONE:
        inst = store.transition_from(inst, S.STOPPING)
    if end is not None:
        inst = store.transition_from(inst, end, reason=f"test {end.value}")
    return inst


def _hot_members(r: redis.Redis) -> set[str]:
    out: set[str] = set()
    for k in r.keys("dynvm:idx:*"):
        out |= {m.decode() for m in r.smembers(k)}
    return out | {m.decode() for m in r.smembers("dynvm:insts")}


def test_ended_records_leave_every_hot_index(store: StateStore, redis_url: str) -> None:
    live = _make(store, "live1", None)
    for iid, end in [("g1", S.GONE), ("f1", S.FAILED), ("l1", S.LOST)]:
        _make(store, iid, end)
    lost_service = _make(store, "svc1", S.LOST, role=Role.SERVICE)
    assert store.retire_ended(history_max=100) == 3
    r = redis.Redis.from_url(redis_url)
    assert _hot_members(r) == {"live1", "svc1"}  # a lost service waits for HA: it stays hot
    assert [i.id for i in store.list_instances()] == ["live1", "svc1"]
    assert [i.id for i in store.list_instances(host="hv1")] == ["live1", "svc1"]
    assert {i.id for i in store.snapshot().instances} == {live.id, lost_service.id}
    # Still readable (vm show, vm list --all) until the retention passes.
    assert store.get_instance("f1") is not None
    assert {i.id for i in store.list_instances(ended=True)} == {"live1", "svc1", "g1", "f1", "l1"}
    assert [i.id for i in store.list_instances(state=S.FAILED)] == ["f1"]
    hist = {h.id: h for h in store.read_history()}
    assert set(hist) == {"g1", "f1", "l1"}
    assert hist["f1"].state == "failed" and hist["f1"].fields["reason"] == "test failed"
    assert hist["f1"].fields["owner"] == "job-f1" and hist["f1"].fields["host"] == "hv1"
    assert hist["f1"].fields["vo"] == "cms" and float(hist["f1"].fields["created"]) > 0


def test_expiry_deletes_records_and_keys_but_not_revived_ones(store: StateStore) -> None:
    _make(store, "g1", S.GONE)
    failed = _make(store, "f1", S.FAILED)
    store.retire_ended(history_max=100)
    assert store.purge_ended(retention_s=3600) == 0  # within retention: kept
    # A retired failed record comes back (recover): it is hot again and never expires while alive.
    back = store.transition_from(failed, S.REQUESTED, host=None, reason="recovering")
    assert store.retired_among(["f1", "g1"]) == ["f1", "g1"]
    assert store.revive(["f1"]) == 1
    assert [i.id for i in store.list_instances()] == ["f1"]
    assert store.purge_ended(retention_s=0) == 1
    assert store.get_instance("g1") is None and store.instance_for_key("k-g1") is None
    assert store.get_instance("f1") == back and store.instance_for_key("k-f1") is not None
    assert [h.id for h in store.read_history()] == ["g1", "f1"]  # the history outlives the records


def test_history_is_capped(store: StateStore) -> None:
    for n in range(300):
        _make(store, f"h{n}", S.GONE)
    store.retire_ended(history_max=100, batch=64)
    assert store.list_instances() == []
    assert 100 <= len(store.read_history(count=1000)) < 300  # MAXLEN ~: approximately capped


def test_vm_list_shows_live_by_default_and_ended_on_request(
    store: StateStore, redis_url: str, tmp_path: Path
) -> None:
    _make(store, "live1", None)
    _make(store, "g1", S.GONE)
    _make(store, "f1", S.FAILED)
    store.retire_ended(history_max=100)
    cfg = tmp_path / "dynvm.yaml"
    from provisioner.config import checkout_images_dir

    cfg.write_text(f"redis_url: {redis_url}\ndomain_type: test\ncatalogue_dir: {checkout_images_dir()}\n")

    def ids(*extra: str) -> list[str]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "provisioner.cli.main",
                "--config",
                str(cfg),
                "-o",
                "json",
                "vm",
                "list",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return [row["id"] for row in json.loads(out.stdout)]

    assert ids() == ["live1"]
    assert sorted(ids("--all")) == ["f1", "g1", "live1"]
    assert ids("--history", "--state", "failed") == ["f1"]
