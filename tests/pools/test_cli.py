"""``dynvm pool`` and ``dynvm image breaker`` against the test-driver farm (real processes, real Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.breaker import BState, Ev, store_of
from tests.control.conftest import Farm

DYNVM = Path(sys.executable).parent / "dynvm"


def dynvm(farm: Farm, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DYNVM), *argv], env=farm.env(), capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture()
def farm(test_farm: Farm) -> Iterator[Farm]:
    yield test_farm
    r, p = test_farm.rt.store.r, test_farm.rt.store.keys.prefix
    r.delete(f"{p}:pool:lhcb", f"{p}:pools", f"{p}:breaker:lhcb-wn:2026.11.0")
    r.srem(f"{p}:breakers", "lhcb-wn:2026.11.0")


def test_pool_set_show_list(farm: Farm) -> None:
    done = dynvm(farm, "-o", "json", "pool", "set", "lhcb", "--max", "4", "--idle-timeout", "90")
    assert done.returncode == 0, done.stderr
    want = {"vo": "lhcb", "min": 0, "max": 4, "idle_timeout_s": 90.0, "revision": 1}
    assert json.loads(done.stdout) == want
    done = dynvm(farm, "-o", "json", "pool", "set", "lhcb", "--min", "2")  # only what is given changes
    assert json.loads(done.stdout)["max"] == 4 and json.loads(done.stdout)["min"] == 2
    shown = json.loads(dynvm(farm, "-o", "json", "pool", "show", "lhcb").stdout)
    assert (shown["min"], shown["max"], shown["revision"], shown["warm"]) == (2, 4, 2, 0)
    rows = json.loads(dynvm(farm, "-o", "json", "pool", "list").stdout)
    assert {r["vo"] for r in rows} == {"cms", "atlas", "lhcb"}
    assert next(r for r in rows if r["vo"] == "lhcb")["set"] is True


@pytest.mark.parametrize("argv,code,fragment", [
    (("pool", "set", "nope", "--max", "1"), 3, "unknown VO 'nope'"),
    (("pool", "set", "lhcb", "--min", "-1"), 2, "out of range"),
    (("pool", "set", "lhcb", "--min", "3", "--max", "2"), 2, "pool min 3 is above max 2"),
    (("pool", "set", "lhcb", "--idle-timeout", "nan"), 2, "not a finite number"),
    (("pool", "show", "x;rm -rf /"), 3, "unknown VO"),
    (("pool", "watch", "--once"), 2, "pools.batch is 'none'"),
    (("image", "breaker", "reset", "no-such-image"), 3, "no breaker and not in the catalogue"),
])
def test_bad_input_is_one_line(farm: Farm, argv: tuple[str, ...], code: int, fragment: str) -> None:
    done = dynvm(farm, *argv)
    assert done.returncode == code and fragment in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_breaker_list_and_reset(farm: Farm) -> None:
    bs = store_of(farm.rt)
    for i in range(bs.settings.failures):
        bs.apply("lhcb-wn:2026.11.0", Ev.FAILURE, "not ready in 120 s", attempt=f"x{i}.1")
    rows = json.loads(dynvm(farm, "-o", "json", "image", "breaker", "list").stdout)
    row = next(r for r in rows if r["image"] == "lhcb-wn:2026.11.0")
    assert (row["state"], row["failures"], row["reason"]) == ("open", 3, "not ready in 120 s")
    assert row["retry_in_s"] > 0
    done = dynvm(farm, "-o", "json", "image", "breaker", "reset", "lhcb-wn")  # the stable channel's version
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "closed"
    assert bs.get("lhcb-wn:2026.11.0").state is BState.CLOSED


def test_status_shows_the_watcher_and_tripped_breakers(farm: Farm) -> None:
    from batch_hooks.watcher import record, status_key

    rt = farm.rt
    try:
        record(rt, None, "UnavailableError: squeue exited 1: slurm_load_jobs error")
        bs = store_of(rt)
        for i in range(bs.settings.failures):
            bs.apply("lhcb-wn:2026.11.0", Ev.FAILURE, "not ready", attempt=f"s{i}.1")
        st = json.loads(dynvm(farm, "-o", "json", "status").stdout)
        assert "1 errors" in st["pool_watcher"] and "slurm_load_jobs error" in st["pool_watcher"]
        assert st["breakers"] == "lhcb-wn:2026.11.0 open (3 failed boots)"
    finally:
        rt.store.r.delete(status_key(rt.store.keys.prefix))
