"""A private, real Slurm cluster for tests: provisioner.farm.slurm's (its own munged, slurmctld and three
slurmd n1..n3 on one machine, own config dir, ports and state dir; SlurmUser=root; the shipped deploy/slurm
hooks installed), with the tests' pool accounts and an AssertionError-raising ``wait_for``.

Everything lives under one directory; clients use SLURM_CONF (see ``env``).  Daemons are started there and
stopped by their pids (never by name: other sessions may run Slurm on this machine too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provisioner.errors import DeadlineExceeded
from provisioner.farm import slurm as product
from provisioner.farm import slurm_demo
from provisioner.farm.slurm import (
    SlurmCluster,
    free_ports,
    install_hooks,
    parse_show_job,
)

__all__ = ["NODES", "POOL", "REPO", "SlurmCluster", "ensure_pool_accounts", "free_port", "free_ports",
           "install_hooks", "parse_show_job", "wait_for"]

POOL = {**slurm_demo.POOL_ACCOUNTS, "alice": "alice001"}  # alice: no VO maps its group
NODES = SlurmCluster.__dataclass_fields__["nodes"].default
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    return free_ports(1)[0]


def ensure_pool_accounts() -> dict[str, int]:
    """Pool accounts cms001/atlas001/lhcb001 (+ alice001: no VO maps its group) and groups; idempotent."""
    return slurm_demo.ensure_pool_accounts(POOL)


def wait_for(cond: Any, timeout: float, what: str) -> Any:
    """The product's wait, failing the test (AssertionError) at the deadline."""
    try:
        return product.wait_for(cond, timeout, what)
    except DeadlineExceeded as err:
        raise AssertionError(str(err)) from None
