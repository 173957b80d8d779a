"""``dynvm farm kill|revive HOST``: one farm host dies for real, and comes back.

A kill is a power cut: SIGKILL, at once, for the host's agent (with every process it started, and the
host's watchdog) and, on the QEMU farm, every process in the host's mount namespace (libvirtd, virtlockd,
virtlogd, every guest QEMU).
On the test-driver farm the host lives inside its agent's process, so the agent's death is the host's.
The host is kept down: the marker file ``<farm>/down/HOST`` (its truth) tells the supervisor not to
restart that host's processes until ``farm revive`` removes it.  A revived host is empty and keeps the
state the monitor gave it (dead/fenced): an operator brings it back with ``dynvm host rejoin HOST``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from provisioner.errors import DeadlineExceeded, NotFoundError, UnavailableError
from provisioner.farm.layout import FarmLayout, FarmState
from provisioner.farm.qemu.procs import descendants, pid_alive


def _running(layout: FarmLayout, host: str) -> FarmState:
    st = layout.read_state()
    if st is None or not st.supervisor_up():
        raise UnavailableError(f"no farm is up in {layout.base}")
    if host not in st.hosts:
        raise NotFoundError(f"farm host {host!r} does not exist (hosts: {', '.join(st.hosts)})")
    return st


def _host_children(st: FarmState, host: str) -> dict[str, int]:
    """The supervisor's children that belong to ``host`` (agent-HOST, watchdog-HOST...), proven ours."""
    return {n: p for n, p in st.children.items() if n.endswith(f"-{host}") and st.ours(n, p)}


def _watchdog_lock(layout: FarmLayout, host: str) -> Path:
    """The host's watchdog lock (ha.watchdog): its holder is the watchdog process, which runs in its own
    session so that it outlives an agent restart, hence is no descendant of the agent."""
    from ha.watchdog import lock_file
    from provisioner.agent.handover import run_dir
    from provisioner.configload import load_config

    return lock_file(run_dir(load_config(layout.config_file)), host)


def watchdog_pid(layout: FarmLayout, host: str) -> int | None:
    from ha.watchdog import holder

    pid = holder(_watchdog_lock(layout, host))
    return pid if pid is not None and pid > 0 else None


def stop_watchdogs(layout: FarmLayout, hosts: list[str]) -> None:
    """Farm down: the hosts' watchdogs go with it (SIGTERM, they let go of their locks)."""
    from ha.watchdog import stop_watchdog

    for h in hosts:
        stop_watchdog(_watchdog_lock(layout, h))


def farm_kill(layout: FarmLayout, host: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """Kill ``host`` and keep it down; returns when every killed process is gone.  Idempotent."""
    st = _running(layout, host)
    layout.down_dir.mkdir(parents=True, exist_ok=True)
    marker = layout.down_dir / host
    killed_at = time.time()
    marker.write_text(f"{killed_at:.6f}\n")  # first: the supervisor must not restart what dies next
    children = _host_children(st, host)
    pids = [p for pid in children.values() for p in (pid, *descendants(pid))]
    watchdog = watchdog_pid(layout, host)
    if watchdog is not None and watchdog not in pids:
        pids.append(watchdog)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    in_namespace = 0
    if st.driver == "qemu":
        from provisioner.farm.qemu import QemuFarm

        in_namespace = QemuFarm(layout.base / "qemu", len(st.hosts)).kill_host(host)
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"farm kill {host}: pids {[p for p in pids if pid_alive(p)]} still alive")
        time.sleep(0.01)
    return {
        "host": host,
        "killed_at": killed_at,
        "killed": sorted(children),
        "processes": len(pids) + in_namespace,
        "kept_down": True,
    }


def farm_revive(layout: FarmLayout, host: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Start ``host`` again (QEMU: its namespace and daemons first, then the supervisor restarts its
    agent); returns once its agent runs and holds the host's lease.  Its state is left to the operator."""
    st = _running(layout, host)
    t0 = time.monotonic()
    if st.driver == "qemu":
        from provisioner.farm.qemu import QemuFarm

        QemuFarm(layout.base / "qemu", len(st.hosts)).revive_host(host)
    (layout.down_dir / host).unlink(missing_ok=True)
    _wait_agent(layout, host, t0 + timeout_s)
    return {"host": host, "revived": True, "seconds": round(time.monotonic() - t0, 2)}


def _wait_agent(layout: FarmLayout, host: str, deadline: float) -> None:
    from provisioner.state.store import StateStore

    st = layout.read_state()
    assert st is not None
    store = StateStore.from_url(st.redis_url)
    try:
        while time.monotonic() < deadline:
            st = layout.read_state()
            name = f"agent-{host}"
            if st is not None and st.ours(name, st.children.get(name)) and store.lease_alive(host):
                return
            time.sleep(0.1)
    finally:
        store.r.close()
    log = layout.logs / f"agent-{host}.log"
    raise DeadlineExceeded(f"farm revive {host}: its agent holds no lease yet (see {log})")
