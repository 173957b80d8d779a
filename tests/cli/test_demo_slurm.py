"""``dynvm demo`` (the README's main command) on the test driver with a real private Slurm: a plain sbatch
job per VO from its pool account runs with a VM of its own VO's image; a warm-pool hit beside a cold start;
``dynvm farm down`` stops the demo's Slurm daemons by their recorded pids.  Without Slurm (--no-slurm) the
VMs are requested directly and the warm/cold pair goes through the hook path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provisioner.cli.demo_jobs import prolog_spans, side_by_side, slurm_unavailable
from provisioner.farm.layout import FarmLayout
from provisioner.farm.qemu.procs import pid_alive
from provisioner.farm.slurm import missing_programs, steps_of
from provisioner.farm.slurm_demo import STATE_FILE, recorded
from provisioner.state.store import StateStore

pytestmark = [pytest.mark.redis, pytest.mark.libvirt, pytest.mark.slow]
VOS = ("cms", "atlas", "lhcb")


def dynvm(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "provisioner.cli.main", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class Demo:
    dir: Path
    run: subprocess.CompletedProcess[str]
    doc: dict[str, Any]
    slurm: dict[str, Any]  # <farm>/slurm.json as the first run left it
    outputs: dict[str, str]  # job id -> its output file
    store: StateStore


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    if os.geteuid() != 0 or missing_programs():
        pytest.fail(f"the demo's Slurm needs root and slurm-wlm + munge (missing: {missing_programs()}; "
                    "deploy/install.sh installs them)")
    d = tmp_path_factory.mktemp("demo") / "farm"  # under pytest's 0700 tmp: the cluster goes to /tmp
    try:
        p = dynvm("-o", "json", "demo", "--dir", str(d), "--timeout", "120")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        doc = json.loads(p.stdout)
        slurm = recorded(d)
        assert slurm is not None, "the demo recorded no Slurm cluster in the farm directory"
        jobs = Path(slurm["base"]) / "jobs"
        outputs = {j["job"]: (jobs / f"{j['job']}.out").read_text() for j in doc["jobs"]}
        st = FarmLayout(d).read_state()
        assert st is not None
        store = StateStore.from_url(st.redis_url)
        yield Demo(d, p, doc, slurm, outputs, store)
        store.close()
    finally:
        dynvm("farm", "down", "--dir", str(d), timeout=180)


def test_each_vos_sbatch_job_ran_on_a_vm_of_its_own_image(demo: Demo) -> None:
    images = {vo: demo.store.require_instance(j["vm"]).image for j in demo.doc["jobs"] for vo in [j["vo"]]}
    assert demo.doc["mode"] == "slurm"
    assert sorted(j["vo"] for j in demo.doc["jobs"]) == sorted(VOS)  # one job per VO (--per-vo 1)
    for j in demo.doc["jobs"]:
        vo, vm = j["vo"], j["vm"]
        inst = demo.store.require_instance(vm)
        assert (j["user"], j["state"], j["exit"], j["problem"]) == (f"{vo}001", "COMPLETED", "0:0", "")
        assert inst.vo == vo and inst.image == j["image"] and inst.image.startswith(f"{vo}-wn:"), inst
        assert inst.owner == f"slurm:demo:{j['job']}"
        assert inst.state.value == "gone" and j["released"]  # EpilogSlurmctld released it
        # The job itself saw its VM (TaskProlog's exports) and ran as the VO's pool account.
        out = demo.outputs[j["job"]]
        assert f"DYNVM_VM={vm} DYNVM_VM_HOST={inst.host} user={vo}001 group={vo} " in out, out
    assert len(set(images.values())) == 3


def test_the_warm_pool_vm_went_to_a_job_and_the_others_started_cold(demo: Demo) -> None:
    events = demo.store.read_events(count=2000)
    hits = {e.instance for e in events if e.kind == "pool_hit"}
    pool_started = [e for e in events if e.kind == "pool_start" and e.extra.get("vo") == "cms"]
    warm = [j for j in demo.doc["jobs"] if j["start"] == "warm"]
    cold = [j for j in demo.doc["jobs"] if j["start"] == "cold"]
    assert [j["vo"] for j in warm] == ["cms"] and len(cold) == 2, demo.doc["jobs"]
    assert pool_started and warm[0]["vm"] in hits  # a pool VM, handed over by the prolog's warm take
    pool_vm = demo.store.require_instance(warm[0]["vm"])
    for j in cold:  # provisioned for the job by its prolog, after it was submitted: never a pool VM
        assert j["vm"] not in hits and demo.store.require_instance(j["vm"]).created > pool_vm.created
    assert all(isinstance(j["vm_ready_ms"], int) and j["vm_ready_ms"] >= 0 for j in demo.doc["jobs"])
    assert set(demo.doc["latency_s"]["warm"]) == {f"cms job {warm[0]['job']}"}
    assert len(demo.doc["latency_s"]["cold"]) == 2


def test_text_mode_prints_the_timeline_and_both_latencies(demo: Demo) -> None:
    """A second run on the running farm, as a person reads it (the demo restarts its Slurm)."""
    p = dynvm("demo", "--dir", str(demo.dir), "--timeout", "120")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    text = p.stdout
    for vo in VOS:
        assert f"submitted by {vo}001 (VO {vo}) with plain sbatch" in text
    assert text.count(": COMPLETED (exit 0:0)") == 3 and text.count("released by EpilogSlurmctld") == 3
    assert text.count(": RUNNING on node n") + text.count(": ran on node n") == 3
    assert "warm-pool hit" in text and "cold start: job → VM ready " in text
    assert "cred=" not in text and "DYNVM_JOB_CRED" not in text  # the job's credential is never shown


def test_no_slurm_requests_directly_and_shows_the_pair_through_the_hook_path(demo: Demo) -> None:
    p = dynvm("demo", "--dir", str(demo.dir), "--no-slurm", "--timeout", "120")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert sum("--no-slurm: requesting the VMs directly" in ln for ln in lines) == 1
    assert p.stdout.count(": ready on hv") == 3
    hook = [ln for ln in lines if "through the hook path" in ln]
    assert len(hook) == 2 and "warm-pool hit" in hook[0] and "cold start" in hook[1], hook
    assert "sbatch" not in p.stdout


def test_an_unfinished_job_makes_the_exit_code_non_zero(demo: Demo) -> None:
    """Jobs that cannot finish within --timeout (a job sleeps 1 s; Slurm starts it about 1 s after sbatch)
    are failures: exit 4 with the reason, or 6 when even the warm pool was not ready in time."""
    p = dynvm("-o", "json", "demo", "--dir", str(demo.dir), "--timeout", "1")
    assert p.returncode in (4, 6), p.stdout[-2000:] + p.stderr[-2000:]
    if p.returncode == 4:
        doc = json.loads(p.stdout)
        assert any("not finished" in j["problem"] for j in doc["jobs"]), doc
    else:
        assert "error" in json.loads(p.stderr.strip().splitlines()[-1])


def test_farm_down_stops_every_slurm_daemon_by_its_recorded_pid(demo: Demo) -> None:
    last = recorded(demo.dir)
    assert last is not None
    pids = [*demo.slurm["pids"].values(), *last["pids"].values()]
    assert {"munged", "slurmctld", "slurmd-n1", "slurmd-n2", "slurmd-n3"} <= set(last["pids"])
    assert any(pid_alive(p) for p in last["pids"].values())
    down = dynvm("farm", "down", "--dir", str(demo.dir), timeout=180)
    assert down.returncode == 0, down.stderr
    assert not [p for p in pids if pid_alive(p)]
    # Job steps are nobody's child (slurmd double-forks them): none of either cluster may be left either.
    assert not steps_of(Path(demo.slurm["conf"])) and not steps_of(Path(last["conf"]))
    assert not (demo.dir / STATE_FILE).exists() and not Path(last["base"]).exists()


# -- the parts that need no farm ------------------------------------------------------------------------


def test_without_slurm_on_path_the_demo_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    why = slurm_unavailable(False)
    assert why is not None and "\n" not in why
    assert why.startswith("Slurm is not installed (munged, slurmctld, slurmd") and "directly" in why
    assert slurm_unavailable(True) == "--no-slurm: requesting the VMs directly"


def test_prolog_spans_read_slurmctld_log_lines_of_either_scheduler() -> None:
    note = "_update_job: setting admin_comment to dynvm"
    log = "\n".join([
        "[2026-12-01T02:49:09.018] _slurm_rpc_submit_batch_job: JobId=1 InitPrio=4294901759 usec=3246",
        "[2026-12-01T02:49:11.571] sched: Allocate JobId=1 NodeList=n1 #CPUs=1 Partition=batch",
        "[2026-12-01T02:49:11.600] sched/backfill: _start_job: Started JobId=2 in batch on n1",
        f"[2026-12-01T02:49:12.091] {note} vm=a host=h cred=u:p for JobId=1",
        f"[2026-12-01T02:49:12.100] {note}: held for JobId=2",  # no VM
        "[2026-12-01T02:49:13.000] sched/backfill: _start_job: Started JobId=2 in batch on n1",  # attempt 2
        f"[2026-12-01T02:49:13.250] {note} vm=b host=h cred=u:p for JobId=2",
    ])
    spans = prolog_spans(log)
    assert {k: round(v, 3) for k, v in spans.items()} == {"1": 0.52, "2": 0.25}


def test_side_by_side_line() -> None:
    line = side_by_side([("atlas job 2", 0.81), ("lhcb job 3", 0.79)], [("cms job 1", 0.06)])
    assert line == ("cold start: job → VM ready 800 ms (atlas job 2 810, lhcb job 3 790)  vs  "
                    "warm-pool hit: 60 ms")


def test_farm_slurm_stop_signals_only_recorded_processes_that_are_still_themselves(tmp_path: Path) -> None:
    from provisioner.farm.qemu.procs import identity
    from provisioner.farm.slurm_demo import stop_farm_slurm

    mine = subprocess.Popen(["sleep", "60"])
    keep = tmp_path / "elsewhere"  # not the record's to remove: neither <farm>/slurm nor a dynvm-slurm- temp
    keep.mkdir()
    try:
        doc = {"base": str(keep), "remove_base": True, "conf": str(tmp_path / "etc" / "slurm.conf"),
               "pids": {"slurmctld": 1, "munged": os.getpid(), "slurmd-n1": mine.pid},
               "idents": {"slurmctld": "another-boot:1", "munged": "x:0", "slurmd-n1": identity(mine.pid)}}
        (tmp_path / STATE_FILE).write_text(json.dumps(doc))
        assert stop_farm_slurm(tmp_path) == [mine.pid]  # init and this test (wrong identities) untouched
        assert mine.wait(timeout=30) == -15 and pid_alive(1)
        assert keep.is_dir() and not (tmp_path / STATE_FILE).exists()
        (tmp_path / STATE_FILE).write_text('{"pids": "nonsense", "conf": 7}')
        assert stop_farm_slurm(tmp_path) == [] and not (tmp_path / STATE_FILE).exists()
    finally:
        mine.kill()
        mine.wait()
