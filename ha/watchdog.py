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

import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.errors import ConflictError, DynvmError
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
    single-use, and their jobs are requeued by the monitor when the host is declared dead.

    Fast first: every such guest's QEMU process is SIGKILLed directly (provisioner.hypervisor.qemuproc),
    all at once, so the guests and their disk leases are gone within milliseconds, not after libvirt's
    SIGTERM-wait-cleanup one domain after another (seconds per TCG guest on a loaded host, which a
    self-fence racing the monitor's restart clock cannot afford).  Then each is destroyed through libvirt,
    in parallel, for libvirt's own cleanup (and for the drivers with no QEMU process: the test driver)."""
    from provisioner.hypervisor.qemuproc import kill_guests

    names = [d.name for d in hv.list_domains()
             if d.metadata.get("role") == HA_ROLE and d.state in (DomainState.RUNNING, DomainState.PAUSED)]
    if not names:
        return []
    kill_guests(set(names))
    errors: list[BaseException] = []

    def destroy(name: str) -> None:
        try:
            hv.destroy(name)
        except BaseException as err:  # collected: one guest's error must not leave the others running
            errors.append(err)

    threads = [threading.Thread(target=destroy, args=(n,), name=f"fence {n}", daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return names


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
                elif killed:  # an HA guest started (or came back) on the host while it is fenced
                    log.error("watchdog %s: still no pet: destroyed %s", pet_file, killed)
                st.killed += killed
            elif not st.armed:
                st.armed = True
                log.warning("watchdog %s: petted again, re-armed", pet_file)
        except (DynvmError, OSError) as err:
            st.errors += 1
            if st.errors in (1, 10, 100) or st.errors % 1000 == 0:  # a dead libvirtd: every poll fails
                log.warning("watchdog %s: %s (%d errors so far)", pet_file, err, st.errors)
        except Exception as err:  # the watchdog must outlive any bug of its own
            st.errors += 1
            log.exception("watchdog %s: unexpected %s", pet_file, type(err).__name__)
        stop.wait(poll_s)
    return st


# ---- the watchdog process (`dynvm watchdog --host NAME`) -------------------------------------------
# Files in the host's run dir (see provisioner.agent.handover.run_dir): NAME.pet (petted by agents),
# NAME.watchdog (lock: held by the running watchdog, holds its pid), NAME.watchdog.json (its status).
# The lock is an flock: it dies with its process, so there is no stale pid to trust.


def pet_file(run_dir: Path, host: str) -> Path:
    return run_dir / f"{host}.pet"


def lock_file(run_dir: Path, host: str) -> Path:
    return run_dir / f"{host}.watchdog"


def status_file(run_dir: Path, host: str) -> Path:
    return run_dir / f"{host}.watchdog.json"


def hold_lock(path: Path) -> int | None:
    """Take the watchdog lock (returns its fd, to keep open) or None when another watchdog holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def holder(path: Path) -> int | None:
    """The pid of the watchdog holding the lock at ``path``, None when no watchdog runs."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def stop_watchdog(path: Path, timeout_s: float = 5.0) -> bool:
    """SIGTERM the watchdog holding ``path`` and wait until it let go; True if one was running."""
    pid = holder(path)
    if pid is None or pid <= 0:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while holder(path) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _write_status(path: Path, st: WatchdogState, timeout_s: float) -> None:
    data = {
        "pid": os.getpid(),
        "timeout_s": timeout_s,
        "fired": st.fired,
        "armed": st.armed,
        "killed": st.killed[-50:],
        "errors": st.errors,
        "last_check": st.last_check,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_status(run_dir: Path, host: str) -> dict[str, object] | None:
    try:
        data = json.loads(status_file(run_dir, host).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def serve(hv: Hypervisor, run_dir: Path, host: str, timeout_s: float, stop: threading.Event) -> WatchdogState:
    """The watchdog process's body: hold the host's lock (ConflictError if another watchdog runs), watch
    the pet file until ``stop`` or until the lock file is removed or replaced (how a farm or an operator
    retires it without knowing its pid), and keep NAME.watchdog.json up to date for observers."""
    lock = lock_file(run_dir, host)
    fd = hold_lock(lock)
    if fd is None:
        raise ConflictError(f"host {host}: a watchdog already runs (pid {holder(lock)}, lock {lock})")
    st = WatchdogState()

    def keeper() -> None:
        while not stop.wait(0.25):
            if not _same_file(fd, lock):
                log.warning("watchdog %s: lock file %s removed; exiting", host, lock)
                stop.set()
            with contextlib.suppress(OSError):
                _write_status(status_file(run_dir, host), st, timeout_s)

    t = threading.Thread(target=keeper, name=f"watchdog-status-{host}", daemon=True)
    t.start()
    try:
        return run_watchdog(hv, pet_file(run_dir, host), timeout_s, stop, poll_s=0.1, state=st)
    finally:
        stop.set()
        t.join(2)
        with contextlib.suppress(OSError):
            _write_status(status_file(run_dir, host), st, timeout_s)
        os.close(fd)
