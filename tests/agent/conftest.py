"""Fixtures of the agent's tests: a host agent's runtime on real Redis and the real libvirt test driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.catalogue.store import Catalogue
from provisioner.config import Config, HostConfig
from provisioner.hypervisor.testdriver import write_test_host_xml
from provisioner.model import Capacity, Host
from provisioner.runtime import Runtime
from provisioner.state import StateStore
from tests.agent.world import RacingHost


@pytest.fixture()
def rt(redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    uri = write_test_host_xml(tmp_path / "hv1.xml", cpus=8, memory_mib=8192)
    cfg = Config(
        redis_url=redis_url,
        domain_type="test",
        catalogue_dir=tmp_path,
        hosts=[HostConfig(name="hv1", uri=uri), HostConfig(name="hv2", uri=uri)],
    )
    store = StateStore(redis_url)
    for name in ("hv1", "hv2"):
        store.register_host(Host(name, uri, capacity=Capacity(8, 8192)))
        store.renew_lease(name, f"agent-{name}", 60)
    hv = RacingHost(uri)
    yield Runtime(
        config=cfg, store=store, catalogue=Catalogue(tmp_path, tmp_path, {}), host="hv1", hypervisor=hv
    )
    hv.close()
