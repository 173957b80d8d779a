"""The session test-driver farm (tests/control/conftest.py) for the pool and breaker tests, pool accounts,
canned batch outputs."""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
from pathlib import Path

import pytest

from tests.batch_hooks.conftest import hook_url, pool_accounts, slurm
from tests.control.conftest import Farm, test_farm

__all__ = ["Farm", "hook_url", "pool_accounts", "slurm", "test_farm"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs a real Slurm cluster (slurm-wlm + munge, root)")

DATA = Path(__file__).resolve().parents[1] / "data"
POOL_ACCOUNTS = {"cms": "cms001", "atlas": "atlas001", "lhcb": "lhcb001", "alice": "alice001"}  # alice: no VO


@pytest.fixture(scope="session")
def pool_uids() -> dict[str, int]:
    """Pool accounts with their groups (idempotent; the same ones tests/batch_hooks uses)."""
    for group, user in POOL_ACCOUNTS.items():
        try:
            grp.getgrnam(group)
        except KeyError:
            if os.geteuid() != 0:
                pytest.fail("the pool tests create pool accounts: run as root")
            subprocess.run(["groupadd", group], check=True)
        try:
            pwd.getpwnam(user)
        except KeyError:
            argv = ["useradd", "-M", "-N", "-g", group, "-s", "/bin/sh", "-d", "/tmp", user]
            subprocess.run(argv, check=True)
    return {user: pwd.getpwnam(user).pw_uid for user in POOL_ACCOUNTS.values()}


def canned(name: str, uids: dict[str, int]) -> str:
    """A canned squeue output with this machine's uids filled in."""
    text = (DATA / "squeue" / name).read_text()
    return re.sub(r"\{uid:([a-z0-9]+)\}", lambda m: str(uids[m.group(1)]), text)
