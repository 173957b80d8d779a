"""The circuit breaker on the real boot path (test-driver farm: real agents, control worker, Redis): an
image whose boots fail trips it after N boots (event, clear error, no more boots), half-opens after the
back-off (one probe), re-opens on a failed probe and closes on a successful one."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from provisioner.breaker import BState, CircuitOpenError, store_of
from provisioner.control.client import release, submit, wait
from provisioner.model import InstanceState
from provisioner.runtime import current_catalogue
from tests.control.conftest import Farm

FAMILY = "brk-wn"
IMAGE = f"{FAMILY}:1.0"
YAML = f"""schema_version: 1
name: {FAMILY}
kind: worker
description: a worker image whose disk is missing (the breaker test)
vos: [cms]
versions:
  - version: "1.0"
    disk: {{path: brk/disk.qcow2, sha256: local, format: qcow2}}
    vcpus: {{default: 1, min: 1, max: 1}}
    memory_mib: {{default: 128, min: 64, max: 256}}
channels:
  stable: "1.0"
"""


@pytest.fixture()
def broken_image(test_farm: Farm) -> Iterator[Farm]:
    path = test_farm.layout.catalogue / f"{FAMILY}.yaml"
    path.write_text(YAML)
    try:
        yield test_farm
    finally:
        path.unlink()
        test_farm.rt.store.r.delete(f"dynvm:breaker:{IMAGE}")
        test_farm.rt.store.r.srem("dynvm:breakers", IMAGE)


def boot(farm: Farm) -> InstanceState:
    rt = farm.rt
    image = current_catalogue(rt).resolve(FAMILY)
    inst, _ = submit(rt, image, "cms")
    done = wait(rt, inst.id, 60)
    if done.state is InstanceState.READY:
        release(rt, inst.id)
    return done.state


def events(farm: Farm, kind: str) -> list[str]:
    return [e.message for e in farm.rt.store.read_events(500) if e.kind == kind and IMAGE in e.message]


def test_breaker_trips_half_opens_and_closes(broken_image: Farm) -> None:
    farm = broken_image
    rt = farm.rt
    bs = store_of(rt)
    n = bs.settings.failures
    assert [boot(farm) for _ in range(n)] == [InstanceState.FAILED] * n
    b = bs.get(IMAGE)
    assert (b.state, b.failures) == (BState.OPEN, n)
    assert events(farm, "breaker_open")
    before = len(rt.store.list_instances())
    refused = rf"image {IMAGE}: circuit open after {n} failed boots; retry after"
    with pytest.raises(CircuitOpenError, match=refused):
        boot(farm)
    assert len(rt.store.list_instances()) == before  # no boot was even requested
    assert events(farm, "breaker_refused")

    rt.store.r.hset(bs.key(IMAGE), "retry_at", "0")  # the back-off has passed
    image = current_catalogue(rt).resolve(FAMILY)
    probe, _ = submit(rt, image, "cms")  # half-open: this one goes
    # ...and no second one: refused while the probe runs ("half-open"), or once it failed (open again: a
    # missing disk fails within milliseconds).  test_state.py races ten admissions for the one probe.
    with pytest.raises(CircuitOpenError, match=r"half-open|circuit open after 4 failed boots"):
        submit(rt, image, "cms")
    assert wait(rt, probe.id, 60).state is InstanceState.FAILED
    b = bs.get(IMAGE)
    assert b.state is BState.OPEN and b.backoff_s == 2 * bs.settings.backoff_s  # failed probe: doubled

    disk = farm.rt.config.storage.artefacts / "brk" / "disk.qcow2"
    disk.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    try:
        rt.store.r.hset(bs.key(IMAGE), "retry_at", "0")
        assert boot(farm) is InstanceState.READY  # the probe succeeds: closed
        assert bs.get(IMAGE).state is BState.CLOSED
        assert events(farm, "breaker_closed")
        assert boot(farm) is InstanceState.READY
    finally:
        disk.unlink()
