"""Fixtures for the batch hooks: the session test-driver farm (its control workers serve the hooks), pool
accounts with their groups, the trusted hook's Redis ACL user, and (marker ``slurm``) a private Slurm."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.batch_hooks.slurm_cluster import ensure_pool_accounts
from tests.control.conftest import Farm, test_farm

__all__ = ["test_farm"]
HOOK_USER = "dynvm-hook"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs a real Slurm cluster (slurm-wlm + munge, root)")


@pytest.fixture(scope="session")
def pool_accounts() -> dict[str, int]:
    if os.geteuid() != 0:
        pytest.fail("the batch hook tests create pool accounts: run as root")
    return ensure_pool_accounts()


def trusted_hook_rules(prefix: str, password: str) -> list[str]:
    """What deploy/slurm/README.md gives the controller hooks: push requests, read their replies."""
    return ["reset", "on", f">{password}", f"~{prefix}:hooks", f"~{prefix}:hookreply:*", "-@all",
            "+lpush", "+blpop", "+time", "+ping", "+auth"]


@pytest.fixture(scope="session")
def hook_url(test_farm: Farm, pool_accounts: dict[str, int]) -> Iterator[str]:
    """redis:// URL of the trusted hook user on the farm's Redis (a real ACL user)."""
    r = test_farm.rt.store.r
    password = secrets.token_hex(16)
    r.execute_command("ACL", "SETUSER", HOOK_USER, *trusted_hook_rules("dynvm", password))
    host, port = r.connection_pool.connection_kwargs["host"], r.connection_pool.connection_kwargs["port"]
    yield f"redis://{HOOK_USER}:{password}@{host}:{port}/0"
    r.execute_command("ACL", "DELUSER", HOOK_USER)


def user_url(base: str, user: str, password: str) -> str:
    from urllib.parse import quote

    tail = base.split("@", 1)[1]
    return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@{tail}"


@pytest.fixture()
def farm(test_farm: Farm) -> Farm:
    return test_farm


