"""The farm supervisor: starts Redis, (the QEMU hosts,) the agents, a control worker and two monitors;
restarts any that die (Redis too: it has its AOF), except the processes of a host killed by ``dynvm farm
kill`` (kept down until ``farm revive``); on SIGTERM stops everything and leaves no process behind.

Run as ``python -m provisioner.farm.supervisor FARM_DIR`` (``dynvm farm up`` does that, detached).

Observable: farm.json (written by this process alone once it runs) holds every child's pid and identity,
restart counts and the last error; ``dynvm farm status`` shows them.  The restart loop survives any
exception: it records it and tries again after a back-off that grows while a child keeps failing.
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

from provisioner.errors import DynvmError, UnavailableError
from provisioner.farm.layout import FarmLayout, FarmState

log = logging.getLogger("dynvm.farm")
RESTART_BACKOFF_S = 0.0  # a stable child (an agent) restarts at once: its host's watchdog is counting
MAX_BACKOFF_S = 10.0
STABLE_S = 10.0  # a child that lived this long starts again from the shortest back-off
STOP_GRACE_S = 8.0
REDIS_START_S = 15.0


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else type(err).__name__
    if not isinstance(err, DynvmError | SystemExit):
        msg = f"{type(err).__name__}: {msg}"
    return msg[:300]


def last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""


class Supervisor:
    def __init__(self, layout: FarmLayout) -> None:
        self.layout = layout
        st = layout.read_state()
        if st is None:
            raise SystemExit(f"{layout.state_file}: missing; run `dynvm farm up`")
        self.state: FarmState = st
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started_at: dict[str, float] = {}
        self.next_try: dict[str, float] = {}
        self.backoff: dict[str, float] = {}
        self.redis: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.qemu: Any = None

    # ----------------------------------------------------------------- children
    def commands(self) -> dict[str, list[str]]:
        base = [sys.executable, "-m", "provisioner.cli.main", "--config", str(self.layout.config_file)]
        cmds = {"worker": [*base, "worker"]}
        for i in range(1, self.state.monitors + 1):
            cmds[f"monitor-{i}"] = [*base, "monitor"]
        for h in self.state.hosts:
            cmds[f"agent-{h}"] = [*base, "agent", "--host", h]
        return cmds

    def host_of(self, name: str) -> str | None:
        """The farm host a child belongs to (``agent-hv1`` -> hv1): it dies and revives with its host."""
        return next((h for h in self.state.hosts if name.endswith(f"-{h}")), None)

    def kept_down(self, name: str) -> bool:
        host = self.host_of(name)
        return host is not None and self.layout.host_down(host)

    def spawn(self, name: str, argv: list[str]) -> None:
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        with open(self.layout.logs / f"{name}.log", "ab") as logf:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            p = subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self.procs[name] = p
        self.started_at[name] = time.monotonic()
        self.state.children[name] = p.pid
        self.state.record(name, p.pid)
        self.save()

    def save(self) -> None:
        self.layout.write_state(self.state)

    def note_error(self, msg: str) -> None:
        log.error("farm: %s", msg)
        self.state.last_error, self.state.last_error_at = msg[:300], time.time()
        self.save()

    def _redis_argv(self) -> list[str]:
        port = self.state.redis_url.rsplit(":", 1)[1].split("/")[0]
        return [
            "redis-server", "--port", port, "--bind", "127.0.0.1", "--dir", str(self.layout.redis_dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--protected-mode", "yes",
        ]

    def start_redis(self) -> None:
        """Start (or restart: the AOF brings the state back) the farm's own Redis; wait until it answers."""
        if not self.state.own_redis:
            return
        import redis

        self.started_at["redis"] = time.monotonic()
        self.layout.redis_dir.mkdir(parents=True, exist_ok=True)
        redis_log = self.layout.logs / "redis.log"
        with open(redis_log, "ab") as logf:
            try:
                self.redis = subprocess.Popen(
                    self._redis_argv(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            except OSError as err:
                raise UnavailableError(f"redis-server did not start: {err}") from None
        self.state.redis_pid = self.redis.pid
        self.state.record("redis", self.redis.pid)
        self.save()
        client = redis.Redis.from_url(self.state.redis_url, socket_timeout=2)
        deadline = time.monotonic() + REDIS_START_S
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.RedisError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    raise UnavailableError(
                        f"redis-server did not start: {last_line(redis_log) or 'no output'} (see {redis_log})"
                    ) from None
                time.sleep(0.02)
            finally:
                client.close()

    def retire_old_hosts(self) -> None:
        """With --keep-state: hosts of an earlier layout still in Redis must receive nothing from now on,
        and no lease of the previous farm's agents may pass for one of ours."""
        if not self.state.keep_state:
            return
        from provisioner.errors import ConflictError
        from provisioner.model import HostState
        from provisioner.state.store import StateStore

        store = StateStore.from_url(self.state.redis_url)
        for h in store.list_hosts():
            # Every agent of the previous farm is gone: a lease it left must not pass for a live agent.
            store.drop_lease(h.name)
            if h.name in self.state.hosts:
                continue
            try:
                store.remove_host(h.name, if_idle=True)
                self.state.retired[h.name] = "removed (not in this farm's layout)"
            except ConflictError as err:
                why = "not in this farm's layout"
                try:
                    store.set_host_state(
                        h.name, HostState.MAINTENANCE, expected=h.state, reason=why, operator=True
                    )
                    self.state.retired[h.name] = f"maintenance: {why}; {err}"
                except DynvmError as err2:  # changed meanwhile: say so, do not guess
                    self.state.retired[h.name] = f"left {h.state.value}: {why}; {err}; {err2}"
            log.warning("farm: host %s: %s", h.name, self.state.retired[h.name])
        self.save()

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
        self.state.record("supervisor", os.getpid())
        self.save()
        try:
            self.start_redis()
            self.retire_old_hosts()
            self.start_hosts()
            for name, argv in self.commands().items():
                self.spawn(name, argv)
        except BaseException as err:
            # The last line of the log and of farm.json: `farm up` reports it as the reason.
            self.note_error(one_line(err))
            self.shutdown()
            raise
        try:
            while not self.stopping:
                try:
                    self.check_children()
                except Exception as err:  # the loop must outlive any one failure
                    self.note_error(f"supervisor loop: {one_line(err)}")
                time.sleep(0.2)
        finally:
            self.shutdown()

    def _due(self, name: str) -> bool:
        return time.monotonic() >= self.next_try.get(name, 0.0)

    def _failed(self, name: str, msg: str) -> None:
        """Count a death or failed start of ``name``; retry after a back-off (growing in a crash loop)."""
        self.state.restarts[name] = self.state.restarts.get(name, 0) + 1
        lived = time.monotonic() - self.started_at.get(name, 0.0)
        b = RESTART_BACKOFF_S if lived > STABLE_S else min(MAX_BACKOFF_S, self.backoff.get(name, 0.25) * 2)
        self.backoff[name] = b
        self.next_try[name] = time.monotonic() + b
        self.note_error(msg)

    def check_children(self) -> None:
        """Restart whatever died: Redis first (everything else needs it), then agents and worker."""
        died = self.redis is not None and self.redis.poll() is not None
        if died and self.redis is not None and not self.stopping and self._due("redis"):
            self._failed("redis", f"redis-server exited with {self.redis.returncode}; restarting")
            self.redis = None
        if self.state.own_redis and self.redis is None and not self.stopping and self._due("redis"):
            try:
                self.start_redis()
            except Exception as err:
                self._failed("redis", f"redis restart failed: {one_line(err)}")
        for name, argv in self.commands().items():
            if self.stopping:
                return
            p = self.procs.get(name)
            down = self.kept_down(name)
            if p is not None and p.poll() is not None:
                if not down:
                    self._failed(name, f"{name} exited with {p.returncode}; restarting")
                del self.procs[name]
                self.state.children.pop(name, None)
                if down:  # `dynvm farm kill`: a host death, not a crash; no restart until revived
                    log.warning("farm: %s exited with %s; host killed, kept down", name, p.returncode)
                    self.save()
            if name not in self.procs and not down and self._due(name):
                self.started_at[name] = time.monotonic()
                try:
                    self.spawn(name, argv)
                except Exception as err:
                    self._failed(name, f"{name} did not start: {one_line(err)}")

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
        try:
            from provisioner.farm.hostkill import stop_watchdogs

            stop_watchdogs(self.layout, self.state.hosts)  # they outlive agents on purpose, not the farm
        except Exception as err:  # shutting down: say so, go on
            log.error("farm: stopping watchdogs: %s", one_line(err))
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
        self.save()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        Supervisor(FarmLayout(Path(sys.argv[1]))).run()
    except BaseException as err:
        print(f"farm supervisor exited: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
