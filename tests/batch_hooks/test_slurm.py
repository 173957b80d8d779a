"""Real Slurm (slurmctld + three slurmd, munge) with deploy/slurm's hooks as shipped, against the test farm:
each VO's jobs get their own VO's VM and release it; job text cannot choose the VO; permanent failures hold
the job with a reason; transient failures requeue it without draining a node."""

from __future__ import annotations

import time

import pytest

from batch_hooks.context import job_key
from batch_hooks.proto import jobvm_key
from provisioner.model import InstanceState
from tests.batch_hooks.slurm_cluster import SlurmCluster, wait_for
from tests.control.conftest import Farm

pytestmark = [pytest.mark.slurm, pytest.mark.redis, pytest.mark.libvirt]
SCRIPT = "#!/bin/sh\necho vm=$DYNVM_VM host=$DYNVM_VM_HOST\nexit 3\n"


def finished(slurm: SlurmCluster, job: str) -> dict[str, str]:
    return wait_for(lambda: (j := slurm.job(job)).get("JobState") in ("COMPLETED", "FAILED") and j, 60,
                    f"job {job} to finish")  # type: ignore[no-any-return]


def vm_of_output(slurm: SlurmCluster, job: str) -> str:
    text = (slurm.base / "jobs" / f"{job}.out").read_text()
    assert text.startswith("vm=") and "host=" in text, text
    return text.split()[0].removeprefix("vm=")


def test_each_vo_gets_its_own_vm_and_releases_it(slurm: SlurmCluster, farm: Farm) -> None:
    jobs = {vo: slurm.sbatch(f"{vo}001", SCRIPT) for vo in ("cms", "atlas", "lhcb")}
    for vo, job in jobs.items():
        info = finished(slurm, job)
        assert info["ExitCode"] == "3:0"  # the script's own exit code
        iid = vm_of_output(slurm, job)
        inst = farm.rt.store.require_instance(iid)
        assert inst.vo == vo and inst.image.startswith(f"{vo}-wn:")
        assert inst.owner == f"slurm:dynvmt:{job}"
        # EpilogSlurmctld released it (single-use VM) and dropped the job's record.
        wait_for(lambda iid=iid: farm.rt.store.require_instance(iid).state is InstanceState.GONE, 30, "gone")
        assert not farm.rt.store.r.exists(jobvm_key("dynvm", job_key("dynvmt", job, 0)))


def test_job_text_naming_another_vo_changes_nothing(slurm: SlurmCluster, farm: Farm) -> None:
    job = slurm.sbatch("cms001", SCRIPT, "--comment=vo=atlas", "--constraint=atlas", "--account=atlas",
                       "--job-name=atlas")
    finished(slurm, job)
    assert farm.rt.store.require_instance(vm_of_output(slurm, job)).vo == "cms"


def test_unknown_vo_is_held_with_a_readable_reason_not_requeued_forever(slurm: SlurmCluster) -> None:
    job = slurm.sbatch("alice001", SCRIPT)
    held = ("JobHeldAdmin", "PENDING")  # reason, state
    info = wait_for(lambda: ((j := slurm.job(job)).get("Reason"), j.get("JobState")) == held and j, 60, "")
    show = slurm.run("scontrol", "show", "job", job).stdout
    assert "AdminComment=dynvm: no VO for user 'alice001'" in show
    assert info["Restarts"] == "1"
    assert all(state == "idle" for state in slurm.node_states().values())  # no node drained
    slurm.run("scancel", job)


def test_transient_failure_requeues_and_completes_later_without_draining(slurm: SlurmCluster,
                                                                       farm: Farm) -> None:
    farm.hold_file.touch()  # boots stall: the prolog's deadline (8 s) passes -> transient
    try:
        job = slurm.sbatch("lhcb001", SCRIPT)
        wait_for(lambda: int(slurm.job(job).get("Restarts", "0")) >= 1, 60, "a requeue")
    finally:
        farm.hold_file.unlink()
    wait_for(lambda: slurm.job(job).get("JobState") == "PENDING", 30, "pending")
    # Slurm makes a requeued job eligible 120 s later; move that to now instead of waiting it out.
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now")
    info = finished(slurm, job)
    assert int(info["Restarts"]) >= 1 and info["ExitCode"] == "3:0"
    inst = farm.rt.store.require_instance(vm_of_output(slurm, job))
    assert inst.vo == "lhcb" and inst.idempotency_key != job_key("dynvmt", job, 0)  # a fresh VM
    assert "drain" not in " ".join(slurm.node_states().values())


def test_another_user_cannot_read_a_jobs_vm_credential(slurm: SlurmCluster) -> None:
    job = slurm.sbatch("cms001", "#!/bin/sh\nsleep 5\n")
    wait_for(lambda: slurm.job(job).get("JobState") == "RUNNING", 60, "running")
    mine = slurm.run("scontrol", "show", "job", job, user="cms001").stdout
    assert "cred=" in mine
    other = slurm.run("scontrol", "show", "job", job, user="atlas001", check=False)
    assert "cred=" not in other.stdout + other.stderr
    finished(slurm, job)




def test_a_vm_lost_under_a_running_job_requeues_it_and_it_completes_once(slurm: SlurmCluster,
                                                                         farm: Farm) -> None:
    from batch_hooks.requeue import SlurmRequeue, sweep

    # The first attempt waits for its VM to be killed; the requeued one finishes at once.
    log = slurm.base / "jobs" / "lost.log"
    script = ("#!/bin/sh\nn=${SLURM_RESTART_COUNT:-0}\necho attempt=$n vm=$DYNVM_VM >> " + str(log) +
              "\n[ $n = 0 ] && sleep 300\nexit 0\n")
    job = slurm.sbatch("atlas001", script)
    wait_for(lambda: log.exists() and "attempt=0" in log.read_text(), 60, "the first attempt running")
    key = job_key("dynvmt", job, 0)
    first = farm.rt.store.r.hget(jobvm_key("dynvm", key), "instance")
    inst = farm.rt.store.require_instance(first)
    assert inst.state is InstanceState.READY
    # The test driver's domains live inside each agent (test:///file.xml is per process), so the VM's death
    # is what its agent's reconciler records when libvirt has lost it (tests/control/test_faults: ghosts).
    farm.rt.store.transition(first, InstanceState.LOST, reason="test: VM killed under its job")
    requeuer = SlurmRequeue(slurm.env)
    assert sweep(farm.rt, {"slurm": requeuer}) == [key]
    assert sweep(farm.rt, {"slurm": requeuer}) == []  # once only
    assert "job_requeued" in [e.kind for e in farm.rt.store.read_events(count=2000) if e.instance == first]
    wait_for(lambda: slurm.job(job).get("JobState") == "PENDING", 60, "requeued")
    # slurmd refuses ("Job credential revoked") a credential created in the same second as the revocation
    # of the requeued attempt's (whole-second times): let a second boundary pass before the new start.
    requeued_at = int(time.time())
    wait_for(lambda: time.time() >= requeued_at + 2, 5, "a second boundary after the requeue")
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now")  # skip Slurm's 120 s requeue delay
    info = finished(slurm, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1"
    lines = log.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["attempt=0", "attempt=1"]
    assert lines[1].split()[1] != f"vm={first}"  # a fresh VM for the new attempt


@pytest.mark.slow
def test_two_hundred_jobs_submitted_at_once_all_complete(slurm: SlurmCluster, farm: Farm) -> None:
    arrays = {vo: slurm.sbatch(f"{vo}001", "#!/bin/sh\n[ -n \"$DYNVM_VM\" ] || exit 9\n", "--array=0-66")
              for vo in ("cms", "atlas", "lhcb")}  # 3 x 67 = 201 jobs

    def states() -> list[str]:
        out = slurm.run("squeue", "-h", "-t", "all", "-o", "%i %T").stdout.split("\n")
        return [ln.split()[1] for ln in out if ln.strip() and ln.split()[0].split("_")[0] in arrays.values()]

    wait_for(lambda: (s := states()) and all(x in ("COMPLETED", "FAILED") for x in s) and len(s) == 201,
             600, "201 jobs to finish")
    assert states().count("COMPLETED") == 201
    owners = [i for i in farm.rt.store.list_instances(ended=True)
              if i.owner and i.owner.split(":")[-1].split("_")[0] in arrays.values()]
    assert len({i.owner for i in owners}) <= 201
    gone = InstanceState.GONE
    wait_for(lambda: all(farm.rt.store.require_instance(i.id).state is gone for i in owners), 60,
             "all released")
