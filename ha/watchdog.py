"""The per-host watchdog: a small process, separate from the agent, that the agent must keep petting.

The agent pets it (touches the pet file) after every successful lease renewal.  If the pets stop for
``timeout_s`` — the agent hung (SIGSTOP, a stuck libvirt call, a deadlock), lost Redis or died — the
watchdog destroys this host's HA-managed guests (role ``service`` in dynvm's domain metadata), so a hung
agent cannot keep VMs alive that the monitor is about to restart elsewhere.  It re-arms when the pets
come back.  On production hosts it can additionally be backed by the kernel/hardware watchdog
(/dev/watchdog, e.g. via the ``watchdog`` daemon's test-binary hook), which reboots the host if this
process itself stops; that is documented, not done here.

Wall-clock file mtimes are used because the pet must cross processes (a new agent after a restart keeps
petting the same file); a clock step forward can fire it early, which errs on the safe side.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.errors import DynvmError
from provisioner.interfaces import DomainState, Hypervisor

log = logging.getLogger(__name__)
HA_ROLE = "service"


def pet(path: Path) -> None:
    """Called by the agent after each successful lease renewal."""
    try:
        os.utime(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def last_pet(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def expired(last: float | None, started: float, now: float, timeout_s: float) -> bool:
    """Never petted counts from the watchdog's own start (an agent gets ``timeout_s`` to come up)."""
    return now - (last if last is not None else started) > timeout_s


@dataclass
class WatchdogState:
    fired: int = 0  # times it fired
    killed: list[str] = field(default_factory=list)  # domain names destroyed
    errors: int = 0
    armed: bool = True
    last_check: float = 0.0


def kill_ha_guests(hv: Hypervisor) -> list[str]:
    """Destroy every running HA-managed guest; returns their names.  Workers are left alone: they are
    single-use, and their jobs are requeued by the monitor when the host is declared dead."""
    killed = []
    for dom in hv.list_domains():
        if dom.metadata.get("role") == HA_ROLE and dom.state in (DomainState.RUNNING, DomainState.PAUSED):
            hv.destroy(dom.name)
            killed.append(dom.name)
    return killed


def run_watchdog(
    hv: Hypervisor,
    pet_file: Path,
    timeout_s: float,
    stop: threading.Event,
    poll_s: float = 0.05,
    clock: Callable[[], float] = time.time,
    state: WatchdogState | None = None,
) -> WatchdogState:
    """Loop until ``stop``: fire once per expiry (and keep killing HA guests while expired), re-arm on a
    fresh pet.  Survives any error (counted and logged)."""
    st = state or WatchdogState()
    started = clock()
    while not stop.is_set():
        now = clock()
        st.last_check = now
        try:
            if expired(last_pet(pet_file), started, now, timeout_s):
                killed = kill_ha_guests(hv)
                if st.armed:
                    st.fired += 1
                    st.armed = False
                    log.error("watchdog %s: no pet for %.1f s: fencing %s", pet_file, timeout_s, killed)
                st.killed += killed
            elif not st.armed:
                st.armed = True
                log.warning("watchdog %s: petted again, re-armed", pet_file)
        except (DynvmError, OSError) as err:
            st.errors += 1
            log.warning("watchdog %s: %s", pet_file, err)
        except Exception as err:  # the watchdog must outlive any bug of its own
            st.errors += 1
            log.exception("watchdog %s: unexpected %s", pet_file, type(err).__name__)
        stop.wait(poll_s)
    return st
