"""The farm supervisor: starts Redis, (the QEMU hosts,) the agents, a control worker and a monitor;
restarts any that die; on SIGTERM stops everything and leaves no process behind.

Run as ``python -m provisioner.farm.supervisor FARM_DIR`` (``dynvm farm up`` does that, detached).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from provisioner.farm.layout import FarmLayout, FarmState

log = logging.getLogger("dynvm.farm")
RESTART_BACKOFF_S = 0.5
STOP_GRACE_S = 8.0


class Supervisor:
    def __init__(self, layout: FarmLayout) -> None:
        self.layout = layout
        st = layout.read_state()
        if st is None:
            raise SystemExit(f"{layout.state_file}: missing; run `dynvm farm up`")
        self.state: FarmState = st
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.redis: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.qemu: Any = None

    # ----------------------------------------------------------------- children
    def commands(self) -> dict[str, list[str]]:
        base = [sys.executable, "-m", "provisioner.cli.main", "--config", str(self.layout.config_file)]
        cmds = {"worker": [*base, "worker"]}
        for h in self.state.hosts:
            cmds[f"agent-{h}"] = [*base, "agent", "--host", h]
        return cmds

    def spawn(self, name: str, argv: list[str]) -> None:
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        logf = open(self.layout.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs[name] = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        logf.close()
        self.state.children[name] = self.procs[name].pid
        self.layout.write_state(self.state)

    def start_redis(self) -> None:
        if not self.state.own_redis:
            return
        port = self.state.redis_url.rsplit(":", 1)[1].split("/")[0]
        self.layout.redis_dir.mkdir(parents=True, exist_ok=True)
        self.redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                port,
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.layout.redis_dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--protected-mode",
                "yes",
            ],
            stdout=open(self.layout.logs / "redis.log", "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.state.redis_pid = self.redis.pid
        import redis

        client = redis.Redis.from_url(self.state.redis_url)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.redis.poll() is not None:
                    raise SystemExit("redis-server did not start; see logs/redis.log") from None
                time.sleep(0.02)

    def start_hosts(self) -> None:
        if self.state.driver != "qemu":
            return
        from provisioner.farm.qemu import QemuFarm

        self.qemu = QemuFarm(self.layout.base / "qemu", len(self.state.hosts))
        self.qemu.up()

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self.state.supervisor_pid = os.getpid()
        self.layout.write_state(self.state)
        try:
            self.start_redis()
            self.start_hosts()
            for name, argv in self.commands().items():
                self.spawn(name, argv)
            while not self.stopping:
                self._check_children()
                time.sleep(0.2)
        finally:
            self.shutdown()

    def _check_children(self) -> None:
        for name, argv in self.commands().items():
            p = self.procs.get(name)
            if p is not None and p.poll() is not None and not self.stopping:
                log.warning("farm: %s exited with %s; restarting", name, p.returncode)
                self.state.restarts[name] = self.state.restarts.get(name, 0) + 1
                time.sleep(RESTART_BACKOFF_S)
                if not self.stopping:
                    self.spawn(name, argv)

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True

    def shutdown(self) -> None:
        self.stopping = True
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.qemu is not None:
            self.qemu.down()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait()
        self.state.children = {}
        self.state.redis_pid = None
        self.state.supervisor_pid = None
        self.layout.write_state(self.state)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Supervisor(FarmLayout(Path(sys.argv[1]))).run()


if __name__ == "__main__":
    main()
