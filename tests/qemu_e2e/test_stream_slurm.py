"""Through real Slurm and the shipped wrapper (deploy/slurm's job_submit.lua + payload): an unmodified job's
output file grows while the job still runs inside its VM (more than 2 MiB of it, byte-exact, stdout and
stderr in print order), another pool account cannot reach that output, and a cancelled job's VM is still
released."""

from __future__ import annotations

import pwd
from collections.abc import Iterator

import pytest

from provisioner.execchan.client import exec_socket
from provisioner.model import InstanceState
from tests.batch_hooks.conftest import server_url, start_slurm, trusted_hook_user
from tests.batch_hooks.slurm_cluster import SlurmCluster, ensure_pool_accounts, wait_for
from tests.qemu_e2e.conftest import QFarm

pytestmark = [pytest.mark.qemu, pytest.mark.redis, pytest.mark.libvirt]
CLUSTER = "dynvmstream"  # not test_slurm_payload's name: its job ids restart at 1 and jobs are keyed by both


@pytest.fixture(scope="module")
def qslurm(qfarm: QFarm) -> Iterator[SlurmCluster]:
    """tests.batch_hooks.conftest.start_slurm's cluster (deploy/slurm's hooks as shipped, the payload
    wrapped), under a cluster name of its own."""
    ensure_pool_accounts()
    r = qfarm.rt.store.r
    with trusted_hook_user(r) as hook_url:
        yield from start_slurm(hook_url, server_url(r), wrap_payload=True, name=CLUSTER)


def test_job_output_file_grows_while_the_job_runs_in_its_vm(qslurm: SlurmCluster, qfarm: QFarm) -> None:
    # The job never ends by itself within the test (it waits for a file nobody creates; 5 min at most):
    # whatever is in its output file arrived while it ran.
    script = ("#!/bin/bash\necho first-line\nhead -c 2500000 /dev/zero | tr '\\0' y\necho\n"
              "echo err-line >&2\ni=0\nwhile [ ! -e /tmp/never ] && [ $i -lt 3000 ]; do\n"
              "  sleep 0.1; i=$((i+1))\ndone\n")
    job = qslurm.sbatch("lhcb001", script)
    out = qslurm.base / "jobs" / f"{job}.out"
    # One output file for both streams (Slurm's default): the wrapper has the guest merge them, so the file
    # has them in print order, as on the node.
    expected = ("first-line\n" + "y" * 2500000 + "\n" + "err-line\n").encode()
    wait_for(lambda: out.exists() and out.read_bytes() == expected, 300, f"job {job}'s output while it runs")
    assert qslurm.job(job)["JobState"] == "RUNNING"
    owned = [i for i in qfarm.rt.store.list_instances(ended=True) if i.owner == f"slurm:{CLUSTER}:{job}"]
    assert len(owned) == 1 and owned[0].vo == "lhcb" and owned[0].host is not None
    # The output never crosses Redis: it comes over the VM's own exec socket, which only the job's uid may
    # open.  Another pool account can neither start anything there nor attach to the run's output.
    sock = exec_socket(qfarm.rt.config.storage.shared_dir, owned[0].id, owned[0].host)
    st = sock.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam("lhcb001").pw_uid, 0o600)
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\n"
             "except PermissionError:\n    sys.exit(13)\n")
    other = qslurm.run("/usr/bin/python3", "-c", probe, str(sock), user="cms001", check=False)
    assert other.returncode == 13, other.stderr
    qslurm.run("scancel", job)
    wait_for(lambda: qslurm.job(job).get("JobState") == "CANCELLED", 120, "cancelled")
    vm_id = owned[0].id
    wait_for(lambda: qfarm.rt.store.require_instance(vm_id).state is InstanceState.GONE, 120, "released")
