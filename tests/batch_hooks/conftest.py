"""Fixtures for the batch hooks: the session test-driver farm (its control workers serve the hooks), pool
accounts with their groups, the trusted hook's Redis ACL user, and (marker ``slurm``) a private Slurm."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.farm.slurm import (
    HOOK_USER,
    SlurmCluster,
    install_hooks,
    missing_programs,
    trusted_hook_rules,
)
from tests.batch_hooks.slurm_cluster import REPO, ensure_pool_accounts
from tests.control.conftest import Farm, test_farm

__all__ = ["HOOK_USER", "test_farm", "trusted_hook_rules"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs a real Slurm cluster (slurm-wlm + munge, root)")


@pytest.fixture(scope="session")
def pool_accounts() -> dict[str, int]:
    if os.geteuid() != 0:
        pytest.fail("the batch hook tests create pool accounts: run as root")
    return ensure_pool_accounts()


@contextlib.contextmanager
def trusted_hook_user(r: object) -> Iterator[str]:
    """The trusted hook's Redis ACL user (prefix ``dynvm``, a fresh password) on ``r``'s server while the
    block runs; yields its redis:// URL."""
    password = secrets.token_hex(16)
    r.execute_command("ACL", "SETUSER", HOOK_USER, *trusted_hook_rules("dynvm", password))  # type: ignore[attr-defined]
    try:
        yield server_url(r, f"{HOOK_USER}:{password}@")
    finally:
        r.execute_command("ACL", "DELUSER", HOOK_USER)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def hook_url(test_farm: Farm, pool_accounts: dict[str, int]) -> Iterator[str]:
    """redis:// URL of the trusted hook user on the farm's Redis (a real ACL user)."""
    with trusted_hook_user(test_farm.rt.store.r) as url:
        yield url


def user_url(base: str, user: str, password: str) -> str:
    from urllib.parse import quote

    tail = base.split("@", 1)[1]
    return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@{tail}"


@pytest.fixture()
def farm(test_farm: Farm) -> Farm:
    return test_farm




def start_slurm(hook_url: str, job_redis: str, wrap_payload: bool, name: str | None = None
                ) -> Iterator[SlurmCluster]:
    """A private Slurm cluster whose hooks are deploy/slurm's as shipped, talking to one farm's Redis;
    ``name``: a cluster name other than the default (jobs are keyed by cluster name and job id)."""
    import shutil
    import sys
    import tempfile

    if missing_programs():
        pytest.fail(f"slurm-wlm and munge are not installed (missing {missing_programs()}; "
                    "deploy/install.sh installs them)")
    # Not under pytest's tmp (0700 parents): the pool accounts must reach their job scripts and outputs.
    base = Path(tempfile.mkdtemp(prefix="dynvm-slurm-"))
    base.chmod(0o755)
    cluster = SlurmCluster(base) if name is None else SlurmCluster(base, name=name)
    common = {"SLURM_CONF": str(cluster.conf)}
    ctld = {**common, "DYNVM_PYTHON": sys.executable, "DYNVM_HOOK_REDIS": hook_url, "DYNVM_PREFIX": "dynvm",
            "DYNVM_PROLOG_TIMEOUT": "8" if not wrap_payload else "240"}
    # The job's user cannot enter the test venv (its python lives under /root): the job-side hooks,
    # stdlib-only by design, run on the system python3 with the checkout on its path.
    task = {**common, "DYNVM_PYTHON": "/usr/bin/python3", "PYTHONPATH": str(REPO),
            "DYNVM_JOB_REDIS": job_redis}
    hooks = install_hooks(base / "hooks", ctld, task)
    cluster.write_files(*hooks, wrap_payload=wrap_payload)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("DYNVM_KEEP_SLURM"):
            shutil.rmtree(base, ignore_errors=True)


def redis_host_port(r: object) -> tuple[str, int]:
    kw = r.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    return str(kw["host"]), int(kw["port"])


def server_url(r: object, auth: str = "") -> str:
    """redis:// URL of ``r``'s server, db 0; ``auth``: ``user:password@`` or nothing (the default user)."""
    host, port = redis_host_port(r)
    return f"redis://{auth}{host}:{port}/0"


@pytest.fixture(scope="session")
def slurm(hook_url: str, test_farm: Farm) -> Iterator[SlurmCluster]:
    """Slurm on the test-driver farm (provisioning only; the batch script runs on the node)."""
    yield from start_slurm(hook_url, server_url(test_farm.rt.store.r), wrap_payload=False)
