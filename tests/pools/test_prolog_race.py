"""Real hook processes race for warm VMs on the test-driver farm: 12 prologs at once (``python -m batch_hooks
generic prolog``, as a batch system runs them) for 4 warm cms VMs: each warm VM goes to exactly one job, the
other 8 jobs get cold VMs of their own (the farm's 24 vCPUs bound the numbers; tests/pools/test_state.py
races 50 processes for 10 warm VMs on the hand-over itself)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_hooks.context import job_key
from batch_hooks.pools import PoolSettings
from batch_hooks.watcher import cycle, pool_state
from provisioner.config import PoolsConfig
from provisioner.control.client import ENDED, release, wait
from provisioner.model import InstanceState, Tier
from provisioner.runtime import Runtime
from tests.conftest import wait_until
from tests.control.conftest import Farm
from tests.pools.test_watcher_farm import squeue

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


@pytest.fixture()
def pool_rt(test_farm: Farm) -> Iterator[Runtime]:
    cfg = test_farm.rt.config.model_copy(update={"pools": PoolsConfig(batch="slurm")})
    rt = dataclasses.replace(test_farm.rt, config=cfg)
    yield rt
    pool_state(rt).set_settings("cms", PoolSettings(0, 0, 0), None)
    for inst in rt.store.list_instances():
        if inst.vo == "cms" and (inst.tier is Tier.POOL or (inst.owner or "").startswith("pbs:race:")):
            release(rt, inst.id)
            wait(rt, inst.id, 30, until=ENDED)
    rt.store.r.delete("dynvm:pool:cms", "dynvm:poolvms:cms", "dynvm:pools")


def test_prologs_race_for_warm_vms(pool_rt: Runtime, test_farm: Farm, hook_url: str,
                                   pool_uids: dict[str, int], tmp_path: Path) -> None:
    rt = pool_rt
    uid = pool_uids["cms001"]
    pool_state(rt).set_settings("cms", PoolSettings(0, 4, 3600), None)
    cycle(rt, squeue(tmp_path, "".join(f"{j}|PENDING|cms001|{uid}|1:00:00\n" for j in range(4))))

    def ready_pool() -> set[str]:
        return {i.id for i in rt.store.list_instances(state=InstanceState.READY)
                if i.tier is Tier.POOL and i.owner is None and i.vo == "cms"}

    warm = wait_until(lambda: w if len(w := ready_pool()) == 4 else None, 30, what="4 warm cms VMs")
    env = {**os.environ, "DYNVM_HOOK_REDIS": hook_url, "DYNVM_PROLOG_TIMEOUT": "60",
           "DYNVM_CONFIG": str(test_farm.layout.config_file)}
    argv = [sys.executable, "-m", "batch_hooks", "generic", "prolog", "--system", "pbs", "--cluster", "race",
            "--user", "cms001", "--job-id"]
    procs = [subprocess.Popen([*argv, f"r{i}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(12)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0] * 12, [p.stderr.read() for p in procs if p.stderr]
    got = {}
    for i in range(12):
        inst = rt.store.instance_for_key(job_key("race", f"r{i}", 0))
        assert inst is not None and inst.owner == f"pbs:race:r{i}" and inst.vo == "cms"
        got[f"r{i}"] = inst.id
    assert len(set(got.values())) == 12  # no VM handed to two jobs
    assert set(got.values()) & warm == warm  # every warm VM went to a job...
    assert len(set(got.values()) - warm) == 8  # ...and the 8 others were provisioned cold
