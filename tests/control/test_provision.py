"""End-to-end provisioning on the real test-driver farm (real Redis, real libvirt test driver, Celery)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from provisioner.control.client import ENDED, choose_image, release, submit, wait
from provisioner.control.inventory import host_inventory
from provisioner.errors import UnknownImageError, UnknownVOError
from provisioner.model import HostState, InstanceState
from tests.conftest import wait_until
from tests.control.conftest import Farm

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


def domains_for(farm: Farm, instance_id: str) -> list[tuple[str, str]]:
    """(host, state) of every libvirt domain carrying this instance id, asking each agent."""
    out = []
    for h in farm.rt.store.list_hosts():
        for d in host_inventory(farm.rt, h.name):
            if d["instance_id"] == instance_id:
                out.append((h.name, d["state"]))
    return out


def cli(farm: Farm, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provisioner.cli.main", *args],
        capture_output=True,
        text=True,
        env=farm.env(),
        timeout=120,
    )


def test_three_vos_get_their_own_images_and_run(test_farm: Farm) -> None:
    rt = test_farm.rt
    got = {}
    for vo in ("cms", "atlas", "lhcb"):
        image, vo_ = choose_image(rt, None, vo)
        inst, created = submit(rt, image, vo_, owner="test")
        assert created
        got[vo] = wait(rt, inst.id, 30)
    for vo, inst in got.items():
        assert inst.state is InstanceState.READY, inst.reason
        assert inst.image.startswith(f"{vo}-wn:")
        assert domains_for(test_farm, inst.id) == [(inst.host, "running")]
    for inst in got.values():
        release(rt, inst.id)
        assert wait(rt, inst.id, 30, until=ENDED).state is InstanceState.GONE
        assert domains_for(test_farm, inst.id) == []


def test_same_idempotency_key_gives_one_vm(test_farm: Farm) -> None:
    rt = test_farm.rt
    image, vo = choose_image(rt, None, "cms")
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: submit(rt, image, vo, idempotency_key="slurm:4242"), range(8)))
    ids = {inst.id for inst, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1
    iid = ids.pop()
    assert wait(rt, iid, 30).state is InstanceState.READY
    assert len(domains_for(test_farm, iid)) == 1
    release(rt, iid)
    assert wait(rt, iid, 30, until=ENDED).state is InstanceState.GONE


def test_concurrent_provisions_never_overbook(test_farm: Farm) -> None:
    rt = test_farm.rt
    image, vo = choose_image(rt, None, "atlas")
    # 3 hosts x 8 vCPU = 24; ask for 30 VMs of 1 vCPU at once: 24 fit, 6 must fail with an explanation.
    with ThreadPoolExecutor(10) as ex:
        insts = list(ex.map(lambda _: submit(rt, image, vo)[0], range(30)))
    final = [wait(rt, i.id, 60) for i in insts]
    ready = [i for i in final if i.state is InstanceState.READY]
    failed = [i for i in final if i.state is InstanceState.FAILED]
    assert len(ready) == 24 and len(failed) == 6
    assert all("no capacity" in i.reason and "capacity" in i.reason for i in failed)
    for h in rt.store.list_hosts():
        claims = rt.store.claims_on(h.name)
        assert h.used_vcpus == sum(c[0] for c in claims.values()) <= h.capacity.vcpus
    for i in ready:
        release(rt, i.id)
    for i in ready:
        assert wait(rt, i.id, 30, until=ENDED).state is InstanceState.GONE
    assert all(h.used_vcpus == 0 for h in rt.store.list_hosts())


def test_no_capacity_is_explained_per_filter(test_farm: Farm) -> None:
    rt = test_farm.rt
    for h in rt.store.list_hosts():
        rt.store.set_host_state(h.name, HostState.DRAINING, expected=h.state, reason="test")
    try:
        r = cli(test_farm, "-o", "json", "vm", "provision", "--vo", "lhcb", "--wait", "--timeout", "60")
        assert r.returncode == 4, r.stderr
        body = json.loads(r.stdout)
        assert body["state"] == "failed"
        assert "hv1" in body["reason"] and "draining" in body["reason"]
    finally:
        for h in rt.store.list_hosts():
            rt.store.set_host_state(h.name, HostState.UP, expected=h.state, reason="test")


def test_unknown_names_are_clean_errors(test_farm: Farm) -> None:
    rt = test_farm.rt
    with pytest.raises(UnknownVOError):
        choose_image(rt, None, "nosuchvo")
    with pytest.raises(UnknownImageError):
        choose_image(rt, "nosuch-image", None)
    r = cli(test_farm, "vm", "provision", "--vo", "nosuchvo")
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "nosuchvo" in r.stderr
    r = cli(test_farm, "host", "show", "hv99")
    assert r.returncode == 3 and "hv99" in r.stderr and "Traceback" not in r.stderr
    r = cli(test_farm, "vm", "provision", "--vo", "cms", "--image", "atlas-wn")
    assert r.returncode != 0 and "atlas-wn" in r.stderr and "Traceback" not in r.stderr
    r = cli(test_farm, "vm", "show", "bad;id")
    assert r.returncode in (2, 3) and r.stderr.count("\n") == 1


def test_cli_lists_and_events(test_farm: Farm) -> None:
    r = cli(test_farm, "-o", "json", "host", "list")
    assert r.returncode == 0, r.stderr
    hosts = json.loads(r.stdout)
    assert sorted(h["name"] for h in hosts) == ["hv1", "hv2", "hv3"]
    assert all(h["lease"] == "alive" for h in hosts)
    r = cli(test_farm, "-o", "json", "vm", "provision", "--vo", "cms", "--wait")
    assert r.returncode == 0, r.stderr
    iid = json.loads(r.stdout)["id"]
    r = cli(test_farm, "-o", "json", "events", "-n", "500")
    kinds = [e["kind"] for e in json.loads(r.stdout) if e.get("instance") == iid]
    assert kinds[:3] == ["requested", "placed", "ready"]
    r = cli(test_farm, "-o", "json", "vm", "release", iid, "--wait")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "gone"
    wait_until(lambda: domains_for(test_farm, iid) == [], 10, what="domain gone")


def test_vm_show_gives_the_health_mark_of_this_placement(test_farm: Farm) -> None:
    from ha.health import HealthStore, Mark

    rt = test_farm.rt
    image, vo = choose_image(rt, None, "cms")
    inst, _ = submit(rt, image, vo)
    try:
        ready = wait(rt, inst.id, 60)
        assert ready.state is InstanceState.READY and ready.host is not None
        shown = json.loads(cli(test_farm, "-o", "json", "vm", "show", inst.id).stdout)
        assert "health" not in shown  # no probe verdict yet
        marks = HealthStore(rt.store.r, rt.store.keys.prefix)
        marks.set(inst.id, state=InstanceState.READY, host=ready.host, epoch=ready.epoch,
                  expect=frozenset({Mark.HEALTHY}), new=Mark.UNHEALTHY, failures=3, detail="tcp 22: refused")
        shown = json.loads(cli(test_farm, "-o", "json", "vm", "show", inst.id).stdout)
        assert (shown["health"], shown["health_failures"], shown["health_detail"]) == (
            "unhealthy", 3, "tcp 22: refused")
    finally:
        release(rt, inst.id)
