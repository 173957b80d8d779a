"""The HTCondor requeuer (condor_vacate through htcondor2) without a pool: malformed ids are refused before
any query, no pool is a clear error at once, a silent collector is cut off at the deadline (real htcondor2
bindings in a child process; no HTCondor daemon can run here)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from batch_hooks.condor_requeue import CondorVacate
from provisioner.errors import DeadlineExceeded, UnavailableError, ValidationError


@pytest.mark.parametrize("cluster, job_id", [("ce01.example.org", "21.0"), ("ce01.example.org", "21.0.x"),
                                             ("ce01;rm -rf /", "21.0.1764539990"), ("", "21.0.1")])
def test_malformed_jobs_are_refused(cluster: str, job_id: str) -> None:
    with pytest.raises(ValidationError, match="malformed"):
        CondorVacate().requeue(cluster, job_id)


def test_no_pool_is_a_clear_error_at_once() -> None:
    t = time.monotonic()
    with pytest.raises(UnavailableError, match=r"cannot vacate 21\.0 on schedd 'ce01.example.org'"):
        CondorVacate(timeout_s=30).requeue("ce01.example.org", "21.0.1764539990")
    assert time.monotonic() - t < 30


def test_a_silent_collector_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setitem(os.environ, "_CONDOR_COLLECTOR_HOST", f"127.0.0.1:{silent.getsockname()[1]}")
        t = time.monotonic()
        with pytest.raises((DeadlineExceeded, UnavailableError)):
            CondorVacate(timeout_s=2).requeue("ce01.example.org", "21.0.1764539990")
        assert time.monotonic() - t < 6
