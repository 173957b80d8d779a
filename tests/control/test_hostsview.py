"""The control worker's short-lived host view: reused within its TTL, counts the worker's own claims so
consecutive placements spread, and is dropped (read afresh) when a claim is refused."""

from __future__ import annotations

import pytest

from provisioner.control.hostsview import HostsView
from provisioner.model import Capacity, Host
from provisioner.state import StateStore

pytestmark = pytest.mark.redis


@pytest.fixture()
def store(redis_url: str) -> StateStore:
    s = StateStore.from_url(redis_url, prefix="hview")
    for k in s.r.scan_iter("hview:*"):
        s.r.delete(k)
    for n in ("hv1", "hv2"):
        s.register_host(Host(n, "test:///default", capacity=Capacity(8, 8192)))
    return s


def test_reused_within_ttl_and_counts_own_claims(store: StateStore) -> None:
    view = HostsView(ttl_s=3600)
    first, fresh = view.snapshot(store)
    assert fresh and {h.name for h in first.hosts} == {"hv1", "hv2"}
    store.register_host(Host("hv3", "test:///default", capacity=Capacity(8, 8192)))
    again, fresh = view.snapshot(store)
    assert not fresh and again is first  # no read within the TTL
    view.claimed("hv1", 2, 1024)
    seen = {h.name: (h.used_vcpus, h.used_memory_mib) for h in view.snapshot(store)[0].hosts}
    assert seen == {"hv1": (2, 1024), "hv2": (0, 0)}
    view.drop()  # a refused claim: the next look reads afresh and sees what others did
    snap, fresh = view.snapshot(store)
    assert fresh and {h.name for h in snap.hosts} == {"hv1", "hv2", "hv3"}


def test_expires_after_ttl(store: StateStore) -> None:
    view = HostsView(ttl_s=0.0)
    assert view.snapshot(store)[1] and view.snapshot(store)[1]
