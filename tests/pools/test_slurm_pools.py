"""Real Slurm (tests/batch_hooks' private cluster, deploy/slurm's hooks as shipped) on the test-driver farm:
pending sbatch jobs of a VO raise its warm pool before they start (one squeue per watcher cycle), and when
they start their PrologSlurmctld takes the warm VMs instead of booting cold ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from batch_hooks.demand import SlurmSource
from batch_hooks.pools import PoolSettings
from batch_hooks.watcher import cycle, pool_state
from provisioner.config import PoolsConfig
from provisioner.model import InstanceState, Tier
from provisioner.runtime import Runtime
from tests.batch_hooks.slurm_cluster import SlurmCluster, wait_for
from tests.control.conftest import Farm

pytestmark = [pytest.mark.slurm, pytest.mark.redis, pytest.mark.libvirt]
SCRIPT = "#!/bin/sh\necho vm=$DYNVM_VM\n"


@pytest.fixture()
def pool_rt(test_farm: Farm) -> Iterator[Runtime]:
    cfg = test_farm.rt.config.model_copy(update={"pools": PoolsConfig(batch="slurm", cluster="dynvmt")})
    rt = dataclasses.replace(test_farm.rt, config=cfg)
    yield rt
    from provisioner.control.client import release

    pool_state(rt).set_settings("cms", PoolSettings(0, 0, 0), None)
    for inst in rt.store.list_instances():
        if inst.tier is Tier.POOL and inst.owner is None and inst.vo == "cms":
            release(rt, inst.id)
    rt.store.r.delete("dynvm:pool:cms", "dynvm:poolvms:cms", "dynvm:pools")


def warm(rt: Runtime) -> set[str]:
    return {i.id for i in rt.store.list_instances(state=InstanceState.READY)
            if i.tier is Tier.POOL and i.owner is None and i.vo == "cms"}


def test_pending_jobs_raise_the_pool_and_take_its_vms(slurm: SlurmCluster, pool_rt: Runtime) -> None:
    rt = pool_rt
    pool_state(rt).set_settings("cms", PoolSettings(0, 3, 3600), None)
    jobs = [slurm.sbatch("cms001", SCRIPT, "--hold") for _ in range(3)]
    atlas = slurm.sbatch("atlas001", SCRIPT, "--hold")
    src = SlurmSource(env=slurm.env)
    rep = cycle(rt, src)
    assert rep.pending.get("cms") == 3 and rep.pending.get("atlas") == 1 and rep.started == {"cms": 3}
    pool = wait_for(lambda: w if len(w := warm(rt)) == 3 else None, 120, "3 warm cms VMs")
    assert all(slurm.job(j)["JobState"] == "PENDING" for j in jobs)  # the pool was ready before they ran
    slurm.run("scontrol", "release", ",".join([*jobs, atlas]))
    for j in [*jobs, atlas]:
        wait_for(lambda j=j: slurm.job(j).get("JobState") == "COMPLETED", 120, f"job {j}")
    got = {(slurm.base / "jobs" / f"{j}.out").read_text().split("=", 1)[1].strip() for j in jobs}
    assert got == pool  # every cms job ran on a warm VM, each on its own
    atlas_vm = (slurm.base / "jobs" / f"{atlas}.out").read_text().split("=", 1)[1].strip()
    assert atlas_vm not in pool and rt.store.require_instance(atlas_vm).vo == "atlas"
    assert cycle(rt, src).pending.get("cms", 0) == 0


def test_reclaim_with_real_squeue(slurm: SlurmCluster, pool_rt: Runtime) -> None:
    """One real squeue for all jobs: a VM whose job Slurm does not know (its epilog never ran) and a VM
    older than its running job's walltime + grace are reclaimed; a running job's VM within its walltime is
    kept."""
    from provisioner.control.client import submit, wait
    from provisioner.runtime import current_catalogue

    rt = dataclasses.replace(pool_rt, config=pool_rt.config.model_copy(
        update={"pools": PoolsConfig(batch="slurm", cluster="dynvmt", reclaim_grace_s=5)}))
    keep_job = slurm.sbatch("cms001", "#!/bin/sh\nsleep 60\n", "--time=10")
    late_job = slurm.sbatch("cms001", "#!/bin/sh\nsleep 60\n", "--time=1")
    for j in (keep_job, late_job):
        wait_for(lambda j=j: slurm.job(j).get("JobState") == "RUNNING", 120, f"job {j} running")
    vms = {i.owner: i for i in rt.store.list_instances() if i.owner in
           (f"slurm:dynvmt:{keep_job}", f"slurm:dynvmt:{late_job}")}
    keep, late = vms[f"slurm:dynvmt:{keep_job}"], vms[f"slurm:dynvmt:{late_job}"]
    image = current_catalogue(rt).resolve("cms-wn")
    leaked, _ = submit(rt, image, "cms", owner="slurm:dynvmt:999999")  # its epilog never ran
    assert wait(rt, leaked.id, 60).state is InstanceState.READY
    old = rt.store.redis_time() - 120
    rt.store.update_instance_fields(late.id, created=old)  # the VM has lived 2 min: past 1 min + 5 s
    rt.store.update_instance_fields(leaked.id, created=old)  # older than the grace
    rt.store.update_instance_fields(keep.id, created=old)  # past the grace too, but within 10 min + 5 s
    rep = cycle(rt, SlurmSource(env=slurm.env))
    assert sorted(rep.reclaimed) == sorted([late.id, leaked.id])
    assert rt.store.require_instance(keep.id).state is InstanceState.READY
    slurm.run("scancel", keep_job, late_job)


def test_open_breaker_requeues_with_the_reason_visible(slurm: SlurmCluster, test_farm: Farm) -> None:
    """A job whose image's circuit is open is requeued (no node drained) with the breaker's one line in its
    AdminComment; once the breaker is reset it runs on a VM."""
    from provisioner.breaker import Ev, reset, store_of

    rt = test_farm.rt
    image = "cms-wn:2026.11.0"
    bs = store_of(rt)
    for i in range(bs.settings.failures):
        bs.apply(image, Ev.FAILURE, "not ready in 120 s", attempt=f"sl{i}.1")
    try:
        job = slurm.sbatch("cms001", SCRIPT)
        wait_for(lambda: int(slurm.job(job).get("Restarts", "0")) >= 1, 60, "a requeue")
        show = slurm.run("scontrol", "show", "job", job).stdout
        why = f"AdminComment=dynvm: requeued: image {image}: circuit open after 3 failed boots; retry after"
        assert why in show
        assert "drain" not in " ".join(slurm.node_states().values())
    finally:
        reset(rt, image)
    wait_for(lambda: slurm.job(job).get("JobState") == "PENDING", 60, "pending again")
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now")  # Slurm would wait 120 s to retry
    wait_for(lambda: slurm.job(job).get("JobState") == "COMPLETED", 120, f"job {job}")
    assert (slurm.base / "jobs" / f"{job}.out").read_text().startswith("vm=")
