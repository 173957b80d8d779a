"""The whole path on real QEMU guests: an unmodified batch script submitted with plain sbatch by a pool
account runs inside its VO's VM (deploy/slurm's job_submit.lua + payload wrapper, as shipped), prints the
guest's /etc/vo and exits with the script's own exit code; the VM is released afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioner.model import InstanceState
from tests.batch_hooks.conftest import server_url, start_slurm, trusted_hook_user
from tests.batch_hooks.slurm_cluster import SlurmCluster, ensure_pool_accounts, wait_for
from tests.qemu_e2e.conftest import QFarm

# Lives beside the QEMU farm's fixture (one farm per session: its directory is fixed).  Needs real Slurm
# too; the qemu marker already selects the heavy, root-only runs.
pytestmark = [pytest.mark.qemu, pytest.mark.redis, pytest.mark.libvirt]


@pytest.fixture(scope="module")
def qslurm(qfarm: QFarm) -> Iterator[SlurmCluster]:
    ensure_pool_accounts()
    r = qfarm.rt.store.r
    with trusted_hook_user(r) as hook_url:
        yield from start_slurm(hook_url, server_url(r), wrap_payload=True)


def test_unmodified_script_runs_inside_its_vos_vm(qslurm: SlurmCluster, qfarm: QFarm) -> None:
    script = "#!/bin/bash\n#SBATCH --job-name=plain\necho \"vo=$(cat /etc/vo)\"\necho to-stderr >&2\nexit 7\n"
    jobs = {vo: qslurm.sbatch(f"{vo}001", script) for vo in ("cms", "atlas")}
    for vo, job in jobs.items():
        info = wait_for(lambda job=job: (j := qslurm.job(job)).get("JobState") in ("COMPLETED", "FAILED")
                        and j, 300, f"job {job}")
        out = (qslurm.base / "jobs" / f"{job}.out").read_text()
        assert out == f"vo={vo}\nto-stderr\n", out
        assert info["ExitCode"] == "7:0" and info["Restarts"] == "0"
        owned = [i for i in qfarm.rt.store.list_instances(ended=True) if i.owner == f"slurm:dynvmt:{job}"]
        assert len(owned) == 1 and owned[0].vo == vo
        wait_for(lambda i=owned[0].id: qfarm.rt.store.require_instance(i).state is InstanceState.GONE, 60,
                 "released")
