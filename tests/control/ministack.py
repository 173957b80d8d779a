"""A small real dynvm stack for one test: test-driver host agents and several control workers as separate
`dynvm agent` / `dynvm worker` processes on a Redis the test chooses, with a configuration the test writes
(quotas, Sentinel URLs...).  The session farm of conftest.py cannot serve such tests: its own control worker
runs the farm's configuration.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provisioner.config import checkout_images_dir
from provisioner.configload import load_config
from provisioner.control.client import client_runtime
from provisioner.hypervisor.testdriver import write_test_host_xml
from provisioner.runtime import Runtime
from tests.conftest import wait_until


@dataclass
class Stack:
    base: Path
    config_file: Path
    rt: Runtime
    hosts: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, *args: str) -> None:
        out = open(self.base / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "provisioner.cli.main", "--config", str(self.config_file), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(
                os.environ,
                PYTHONPATH=os.pathsep.join(
                    filter(
                        None,
                        [str(Path(__file__).resolve().parents[2]), os.environ.get("DYNVM_TEST_PYTHONPATH")],
                    )
                ),
            ),
        )
        out.close()

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def agents_up(self) -> bool:
        store = self.rt.store
        return all(store.get_host(h) is not None and store.lease_alive(h) for h in self.hosts)


def stack_config(base: Path, redis_url: str, hosts: list[str], cpus: int, **extra: Any) -> dict[str, Any]:
    catalogue = base / "shared" / "catalogue"
    if not catalogue.exists():
        shutil.copytree(checkout_images_dir(), catalogue, ignore=shutil.ignore_patterns("build", "*.sh"))
    for d in ("images", "instances"):
        (base / "shared" / d).mkdir(parents=True, exist_ok=True)
    entries = [
        {
            "name": h,
            "uri": write_test_host_xml(base / f"{h}.xml", cpus, cpus * 2048),
            "detection_class": "fast",
        }
        for h in hosts
    ]
    cfg: dict[str, Any] = {
        "schema_version": 1,
        "redis_url": redis_url,
        "catalogue_dir": str(catalogue),
        "domain_type": "test",
        "storage": {"shared_dir": str(base / "shared")},
        "hosts": entries,
        "vos": {vo: {"image": f"{vo}-wn", "groups": [vo]} for vo in ("cms", "atlas", "lhcb")},
        "timeouts": {"visibility_s": 30, "reconcile_interval_s": 5},
    }
    cfg.update(extra)
    return cfg


@contextmanager
def mini_stack(
    base: Path, cfg: dict[str, Any], workers: int = 3, worker_concurrency: int = 4
) -> Iterator[Stack]:
    """Agents for every configured host and ``workers`` control workers; all stopped on exit."""
    base.mkdir(parents=True, exist_ok=True)
    f = base / "dynvm.yaml"
    f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = load_config(f)
    stack = Stack(base, f, client_runtime(config), [h.name for h in config.hosts])
    try:
        for h in stack.hosts:
            stack.start(f"agent-{h}", "agent", "--host", h)
        for i in range(workers):
            stack.start(f"worker-{i}", "worker", "--concurrency", str(worker_concurrency))
        wait_until(stack.agents_up, timeout=60, interval=0.2, what="the stack's agents to hold their leases")
        yield stack
    finally:
        for name in list(stack.procs):
            stack.stop(name)
        stack.rt.store.close()
