"""`dynvm host rejoin|undrain|show` against a real Redis: dead/fenced hosts come back only by the operator's
rejoin (with a live agent), undrain refuses them, and show reports the agent's lease health."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from provisioner.cli.main import main
from provisioner.model import Capacity, Host, HostState
from provisioner.state import StateStore
from provisioner.state.hosts import LeaseHealth
from tests.catalogue.helpers import make_catalogue, write_config

pytestmark = pytest.mark.redis
DB = 12  # a database of the session Redis no other test uses


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: str) -> Iterator[StateStore]:
    url = redis_server.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    cat, root = make_catalogue(tmp_path)
    monkeypatch.setenv("DYNVM_CONFIG", str(write_config(tmp_path, cat, root, extra=f"redis_url: {url}\n")))
    monkeypatch.setenv("DYNVM_FARM_DIR", str(tmp_path / "farm"))
    s = StateStore.from_url(url)
    s.register_host(Host("hv1", "test:///default", capacity=Capacity(4, 4096)))
    yield s
    redis.Redis.from_url(url).flushdb()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_dead_host_comes_back_only_by_rejoin(store: StateStore, capsys: pytest.CaptureFixture[str]) -> None:
    store.set_host_state("hv1", HostState.DEAD, expected=HostState.UP, reason="monitor")
    rc, _, err = run(capsys, "host", "undrain", "hv1")
    assert rc == 4 and "rejoin" in err and store.require_host("hv1").state is HostState.DEAD
    rc, _, err = run(capsys, "host", "rejoin", "hv1")  # no agent holds the lease: refused
    assert rc == 4 and "start its agent first" in err, err
    assert store.require_host("hv1").state is HostState.DEAD
    store.acquire_lease("hv1", "agent-1", 30)
    rc, out, err = run(capsys, "-o", "json", "host", "rejoin", "hv1")
    assert rc == 0, err
    assert json.loads(out)["was"] == "dead" and store.require_host("hv1").state is HostState.UP
    rc, _, err = run(capsys, "host", "rejoin", "hv1")  # an up host: nothing to rejoin
    assert rc == 4 and "undrain" in err


def test_show_reports_lease_health(store: StateStore, capsys: pytest.CaptureFixture[str]) -> None:
    store.acquire_lease("hv1", "agent-1", 30)
    store.renew_lease("hv1", "agent-1", 30, LeaseHealth(4, 1, 2, "ReadOnlyError: read only replica"))
    rc, out, err = run(capsys, "-o", "json", "host", "show", "hv1")
    assert rc == 0, err
    row = json.loads(out)
    got = (row["lease"], row["lease_failures"], row["lease_refusals"], row["lease_losses"])
    assert got == ("alive", 4, 1, 2)
    assert row["lease_last_error"].startswith("ReadOnlyError")
