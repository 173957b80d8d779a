"""Restarting only an agent is not a host death: a restarted agent takes its dead predecessor's lease over.

Each agent records ``(machine, boot id, pid, process start time, lease token)`` in
``<run_dir>/agent-HOST.json`` once it holds the lease (``run_dir``: ``ha.run_dir``, default
``<storage.shared_dir>/run/agents``).  A new agent for the same host that finds that record, on the same
machine and boot, with the recorded pid gone or now another process (start time differs: pid reuse),
hands the lease from the old token to its own in one compare-and-set (handover_lease.lua): no wait for the
old lease to expire, no gap a monitor could take for a death.  Anything else — no record, a record from
another machine or boot, a live predecessor, a lease that another token holds — falls back to
:func:`provisioner.agent.lease.acquire`, which waits for a free lease or exits 4 while another agent
renews it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from provisioner.config import Config

log = logging.getLogger(__name__)


class HandoverStore(Protocol):
    def handover_lease(self, host: str, old_token: str, token: str, ttl_s: float) -> str | None: ...

    def add_event(
        self, kind: str, message: str = "", *, host: str | None = None, instance: str | None = None
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class AgentRecord:
    host: str
    machine: str
    boot_id: str
    pid: int
    start: int  # process start time in clock ticks since boot (/proc/PID/stat field 22)
    token: str


def run_dir(config: Config) -> Path:
    return config.ha.run_dir or config.storage.shared_dir / "run" / "agents"


def record_path(config: Config, host: str) -> Path:
    return run_dir(config) / f"agent-{host}.json"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` (ticks since boot), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def own_record(host: str, token: str) -> AgentRecord:
    pid = os.getpid()
    return AgentRecord(host, socket.gethostname(), boot_id(), pid, proc_start(pid) or 0, token)


def write_record(path: Path, rec: AgentRecord) -> None:
    """Atomically (a reader sees the old or the new record, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(rec)))
    os.replace(tmp, path)


def read_record(path: Path) -> AgentRecord | None:
    """The record, or None when missing or malformed (then there is nothing to hand over)."""
    try:
        raw = json.loads(path.read_text())
        return AgentRecord(
            host=str(raw["host"]),
            machine=str(raw["machine"]),
            boot_id=str(raw["boot_id"]),
            pid=int(raw["pid"]),
            start=int(raw["start"]),
            token=str(raw["token"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def predecessor_dead(rec: AgentRecord, host: str) -> bool:
    """True only when ``rec`` is this host's agent on this very machine and boot, and it is gone."""
    if rec.host != host or rec.machine != socket.gethostname() or rec.boot_id != boot_id():
        return False  # cannot judge a process of another machine or boot
    if rec.pid == os.getpid():
        return False
    return proc_start(rec.pid) != rec.start


def take_over(store: HandoverStore, path: Path, host: str, token: str, ttl_s: float) -> bool:
    """Hand the lease over from a dead predecessor recorded at ``path``; True when ``token`` holds it."""
    rec = read_record(path)
    if rec is None or not predecessor_dead(rec, host):
        return False
    holder = store.handover_lease(host, rec.token, token, ttl_s)
    if holder is not None:
        log.warning("lease %s: held by %s, not by the dead agent %d's token; waiting", host, holder, rec.pid)
        return False
    log.warning("lease %s: taken over from the dead agent (pid %d, token %s)", host, rec.pid, rec.token)
    with contextlib.suppress(Exception):  # reporting must not stop the agent
        store.add_event("agent_handover", f"lease taken over from dead agent pid {rec.pid}", host=host)
    return True


def forget(path: Path, token: str) -> None:
    """On a clean stop: remove our record (only if it is still ours)."""
    rec = read_record(path)
    if rec is not None and rec.token == token:
        path.unlink(missing_ok=True)
