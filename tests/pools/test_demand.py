"""Demand readings: canned squeue and HTCondor outputs (tests/data), hostile ones refused line by line,
VOs from trusted identity only, one squeue call per cycle through a real subprocess."""

from __future__ import annotations

from pathlib import Path

import classad2
import pytest

from batch_hooks.demand import (
    CondorSource,
    SlurmSource,
    VOResolver,
    count,
    parse_condor,
    parse_squeue,
)
from provisioner.configload import load_config
from provisioner.errors import UnavailableError
from tests.pools.conftest import DATA, canned


def resolver() -> VOResolver:
    return VOResolver(load_config(None))  # the embedded default: cms, atlas, lhcb by Unix group


def test_mixed_output_counts_pending_per_vo(pool_uids: dict[str, int]) -> None:
    reading = parse_squeue(canned("mixed.txt", pool_uids))
    assert reading.complete and len(reading.jobs) == 12
    d = count(reading, resolver())
    # cms: 101, 102 and two array tasks; 402 claims cms001 but carries atlas001's uid: trusted neither.
    assert d.pending == {"cms": 4, "atlas": 1, "lhcb": 1}
    assert d.unmapped == 2  # alice001 (a group no VO maps) and the uid/user mismatch
    assert d.jobs is not None and d.jobs["202"].walltime_s == 7200 and d.jobs["201"].walltime_s is None
    assert d.jobs["103_2"].state == "PENDING" and d.jobs["502"].state == "CANCELLED"


def test_hostile_output_is_refused_line_by_line(pool_uids: dict[str, int]) -> None:
    reading = parse_squeue(canned("hostile.txt", pool_uids))
    assert [j.job_id for j in reading.jobs] == ["101", "201"]
    assert reading.rejected == 15 and reading.first_problem.startswith("line 2: not 5 fields")
    d = count(reading, resolver())
    assert d.pending == {"cms": 1, "atlas": 1}
    assert d.jobs is None  # a reading with refused lines is never trusted for reclaim


def test_condor_ads_canned(pool_uids: dict[str, int]) -> None:
    ads = list(classad2.parseAds((DATA / "condor" / "jobs.ads").read_text()))
    reading = parse_condor(ads)
    # The job ids the HTCondor hooks give a job's VM (owner htcondor:<schedd>:<cluster.proc.qdate>).
    assert [j.job_id for j in reading.jobs] == ["12.0.1700000000", "12.1.1700000000", "13.0.1700000001",
                                                "14.0.1700000002"]
    assert reading.rejected == 5
    d = count(reading, resolver())
    assert d.pending == {"cms": 2, "lhcb": 1} and d.jobs is None
    assert reading.jobs[2].walltime_s == 7200 and reading.jobs[2].state == "RUNNING"
    assert count(CondorSource(lambda: ads[:4]).read(), resolver()).jobs is not None


def test_condor_schedd_unreachable_is_unavailable() -> None:
    def boom() -> list[object]:
        raise RuntimeError("Unable to locate local daemon.")

    with pytest.raises(UnavailableError, match="htcondor schedd: Unable to locate"):
        CondorSource(boom).read()


def fake_squeue(tmp_path: Path, out: str, rc: int = 0) -> tuple[str, Path]:
    (tmp_path / "out.txt").write_text(out)
    calls = tmp_path / "calls"
    script = tmp_path / "squeue"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncat {tmp_path / "out.txt"}\nexit {rc}\n')
    script.chmod(0o755)
    return str(script), calls


def test_slurm_source_one_call_with_the_documented_format(tmp_path: Path, pool_uids: dict[str, int]) -> None:
    exe, calls = fake_squeue(tmp_path, canned("mixed.txt", pool_uids))
    reading = SlurmSource(squeue=exe).read()
    assert len(reading.jobs) == 12
    assert calls.read_text().splitlines() == ["-h -a -r -t all -o %i|%T|%u|%U|%l"]


def test_slurm_source_failures_are_one_line(tmp_path: Path) -> None:
    exe, _ = fake_squeue(tmp_path, "", rc=1)
    with pytest.raises(UnavailableError, match="squeue exited 1"):
        SlurmSource(squeue=exe).read()
    with pytest.raises(UnavailableError, match="squeue: "):
        SlurmSource(squeue=str(tmp_path / "missing")).read()
