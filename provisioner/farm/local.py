"""``dynvm farm up|down|status``: bring the embedded default up on this machine and find it again."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from provisioner.config import Config, checkout_images_dir
from provisioner.errors import (
    ConflictError,
    DeadlineExceeded,
    DynvmError,
    PermanentError,
    UnavailableError,
)
from provisioner.farm.layout import FarmLayout, FarmState, pid_alive
from provisioner.redisurl import redact

HOST_CPUS = 16
HOST_MEMORY_MIB = 32768
UP_TIMEOUT_S = 90.0
# The seed's three classes (critical / not-so-critical / non-critical: 20 / 40 / 60 s), in seconds here.
DETECTION_CLASSES: dict[str, dict[str, float]] = {
    "critical": {"lease_ttl_s": 1.0, "dead_after_s": 1.0, "samples": 2},
    "fast": {"lease_ttl_s": 2.0, "dead_after_s": 2.5, "samples": 2},
    "standard": {"lease_ttl_s": 3.0, "dead_after_s": 4.0, "samples": 2},
    "slow": {"lease_ttl_s": 10.0, "dead_after_s": 30.0, "samples": 3},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_names(n: int) -> list[str]:
    return [f"hv{i}" for i in range(1, n + 1)]


def _farm_config(
    layout: FarmLayout,
    driver: str,
    hosts: list[str],
    redis_url: str,
    qemu: Any,
    host_cpus: int,
    host_memory_mib: int,
    host_classes: list[str] | None = None,
    ha: dict[str, float] | None = None,
) -> dict[str, Any]:
    from provisioner.hypervisor.testdriver import write_test_host_xml

    layout.hosts_dir.mkdir(parents=True, exist_ok=True)
    host_entries = []
    for i, h in enumerate(hosts):
        if driver == "test":
            uri = write_test_host_xml(layout.hosts_dir / f"{h}.xml", host_cpus, host_memory_mib)
        else:
            uri = qemu.host_uri(h)
        klass = host_classes[i % len(host_classes)] if host_classes else "fast"
        entry = {"name": h, "uri": uri, "labels": {"rack": f"r{i % 2 + 1}"}, "detection_class": klass}
        entry["peer_address"] = f"127.0.0.1:{_free_udp_port()}"  # agents' UDP heartbeats (self-fencing)
        if qemu is not None:
            entry["migration_uri"] = qemu.migration_uri(h)
            entry["virtlockd_pidfile"] = str(qemu.paths(h).pidfile("virtlockd"))  # storage-lease check
        host_entries.append(entry)
    vos = {vo: {"image": f"{vo}-wn", "groups": [vo]} for vo in ("cms", "atlas", "lhcb")}
    network: dict[str, Any] = {}
    if qemu is not None:
        network = {
            "bridge": qemu.bridge,
            "probe_netns": qemu.netns,
            "prefix_len": int(qemu.subnet.split("/")[1]),
        }
    return {
        "schema_version": 1,
        "redis_url": redis_url,
        "catalogue_dir": str(layout.catalogue),
        "domain_type": "test" if driver == "test" else "qemu",
        "storage": {"shared_dir": str(layout.shared), "unrecognised_shared": driver == "qemu"},
        "hosts": host_entries,
        "vos": vos,
        "network": network,
        "detection_classes": DETECTION_CLASSES,
        "ha": ha or {},
        # TCG guests mostly idle after boot; the real farm's hosts have 2 cores each.
        "scheduler": {"cpu_overcommit": 1.0 if driver == "test" else 8.0},
        "timeouts": {"visibility_s": 30 if driver == "test" else 300, "reconcile_interval_s": 5},
    }


def _check_running(st: FarmState, layout: FarmLayout, hosts: int, driver: str, redis_url: str | None) -> None:
    """A running farm is returned as it is only if it is the one asked for; anything else is a conflict."""
    if st.driver != driver or len(st.hosts) != hosts:
        raise ConflictError(
            f"a farm is already up in {layout.base} ({st.driver}, {len(st.hosts)} hosts): "
            "run `dynvm farm down` first"
        )
    if redis_url is not None and redis_url != st.redis_url:
        where = "its own Redis" if st.own_redis else f"Redis at {redact(st.redis_url)}"
        raise ConflictError(
            f"a farm is already up in {layout.base} with {where}; --redis-url {redact(redis_url)} "
            "needs a new farm: run `dynvm farm down` first"
        )


def _fresh_state(layout: FarmLayout, redis_url: str | None) -> None:
    """A new farm starts from nothing: no Redis data, no overlays or run files, a fresh catalogue copy.
    An external Redis is never emptied by us: if it holds dynvm state, that is a conflict."""
    if redis_url is not None:
        from provisioner.state.store import StateStore

        store = StateStore.from_url(redis_url)
        try:
            old = [h.name for h in store.list_hosts()] or (["(instances)"] if store.list_instances() else [])
        finally:
            store.r.close()
        if old:
            raise ConflictError(
                f"redis at {redact(redis_url)} already holds dynvm state (hosts {', '.join(old[:5])}): "
                "pass --keep-state to use it, or give an empty database"
            )
    for d in (layout.redis_dir, layout.shared / "instances", layout.shared / "run", layout.catalogue):
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d)
        elif d.exists() or d.is_symlink():
            d.unlink()


def farm_up(
    layout: FarmLayout,
    hosts: int,
    driver: str,
    redis_url: str | None = None,
    timeout_s: float = UP_TIMEOUT_S,
    host_cpus: int = HOST_CPUS,
    host_memory_mib: int = HOST_MEMORY_MIB,
    keep_state: bool = False,
    host_classes: list[str] | None = None,
    ha: dict[str, float] | None = None,
    settings: dict[str, Any] | None = None,
) -> FarmState:
    """Start the farm (an identical running farm is returned as it is).

    A new farm starts from clean state (its own Redis data, overlays and catalogue copy are wiped) unless
    ``keep_state``; then hosts of an earlier layout are removed, or put in maintenance while they hold VMs
    (the returned state's ``retired`` says which).  ``host_classes``: detection classes given to the hosts
    in turn (default: every host "fast"); ``ha``: settings of the configuration's ha section; ``settings``:
    top-level configuration settings over the farm's own (benchmarks: ``guest_cpu_readback``).
    """
    if driver not in ("test", "qemu"):
        raise PermanentError(f"--driver {driver!r}: choose test or qemu")
    if not 1 <= hosts <= 64:
        raise PermanentError(f"--hosts {hosts}: choose 1..64")
    if driver == "qemu" and os.geteuid() != 0:
        raise PermanentError("--driver qemu needs root (it starts one libvirtd per host in namespaces)")
    st = layout.read_state()
    if st is not None and st.supervisor_up():
        _check_running(st, layout, hosts, driver, redis_url)
        return st
    if st is not None:
        farm_down(layout)  # leftovers of a farm whose supervisor died (only processes proven ours)
    if not keep_state:
        _fresh_state(layout, redis_url)
    for d in (layout.base, layout.logs, layout.shared, layout.shared / "images", layout.shared / "instances"):
        d.mkdir(parents=True, exist_ok=True)
    names = host_names(hosts)
    url = redis_url or f"redis://127.0.0.1:{_free_port()}/0"
    qemu = None
    if driver == "qemu":
        from provisioner.farm.qemu import QemuFarm, prepare_farm_catalogue

        qemu = QemuFarm(layout.base / "qemu", hosts)
        prepare_farm_catalogue(layout)
    elif not layout.catalogue.exists():
        shutil.copytree(
            checkout_images_dir(),
            layout.catalogue,
            ignore=shutil.ignore_patterns("build", "*.sh", "__pycache__"),
        )
    cfg = _farm_config(layout, driver, names, url, qemu, host_cpus, host_memory_mib, host_classes, ha)
    cfg.update(settings or {})
    Config.model_validate(cfg)  # our own output must be valid; fail here, not in four child processes
    tmp = layout.config_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, layout.config_file)
    st = FarmState(
        driver=driver,
        hosts=names,
        redis_url=url,
        started=time.time(),
        own_redis=redis_url is None,
        keep_state=keep_state,
    )
    layout.write_state(st)
    log_path = layout.logs / "supervisor.log"
    with open(log_path, "ab") as logf:
        log_offset = logf.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "provisioner.farm.supervisor", str(layout.base)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        _wait_up(layout, names, timeout_s, proc, log_offset)
    except Exception:
        farm_down(layout)
        raise
    st2 = layout.read_state()
    assert st2 is not None
    return st2


def _supervisor_exit_reason(layout: FarmLayout, proc: subprocess.Popen[bytes], log_offset: int) -> str:
    """Why the supervisor exited: the error it recorded, else its log's last line, else its status."""
    st = layout.read_state()
    if st is not None and st.last_error:
        return st.last_error
    try:
        with open(layout.logs / "supervisor.log", "rb") as f:
            f.seek(log_offset)
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    if lines:
        return lines[-1].removeprefix("farm supervisor exited: ")[:300]
    return f"exit status {proc.returncode}"


def _wait_up(
    layout: FarmLayout, names: list[str], timeout_s: float, proc: subprocess.Popen[bytes], log_offset: int
) -> None:
    """Until every host's agent holds its lease and has registered its host; the supervisor's death ends the
    wait at once."""
    from provisioner.state.store import StateStore

    deadline = time.monotonic() + timeout_s
    st = layout.read_state()
    assert st is not None
    store = StateStore.from_url(st.redis_url)
    missing: list[str] = names
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                why = _supervisor_exit_reason(layout, proc, log_offset)
                see = "" if "(see " in why else f" (see {layout.logs / 'supervisor.log'})"
                raise UnavailableError(f"farm supervisor exited: {why}{see}")
            st = layout.read_state()
            try:
                # Agents are spawned only after start-up (and --keep-state's host retirement) is done.
                spawned = set(st.children) if st is not None else set()
                # An agent takes its lease before it registers the host: up = leased AND registered.
                missing = [
                    h for h in names
                    if f"agent-{h}" not in spawned or not store.lease_alive(h) or store.get_host(h) is None
                ]
            except UnavailableError:
                missing = names
            if not missing:
                return
            time.sleep(0.1)
    finally:
        store.r.close()
    raise DeadlineExceeded(
        f"farm not up after {timeout_s:.0f} s: no lease from {', '.join(missing)} (see {layout.logs})"
    )


def _stop(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def farm_down(layout: FarmLayout, timeout_s: float = 60.0) -> bool:
    """Stop the supervisor (which stops everything it started). True if a farm was running.

    Only processes proven to be the farm's (pid + identity recorded at start) are signalled; a stale
    farm.json (reboot, pid reuse) stops nothing that is not ours.  Returns once they are all gone.
    """
    from provisioner.farm.slurm_demo import stop_farm_slurm

    stop_farm_slurm(layout.base)  # `dynvm demo`'s private Slurm (recorded pids) before what its hooks call
    st = layout.read_state()
    if st is None:
        return False
    was_up = st.supervisor_up()
    if was_up and st.supervisor_pid:
        _stop(st.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while st.supervisor_up():
            if time.monotonic() > deadline:
                _stop(st.supervisor_pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    # Belt and braces: nothing the farm started may outlive it.
    latest = layout.read_state() or st
    ours = [(n, p) for s in (st, latest) for n, p in [*s.children.items(), ("redis", s.redis_pid)]]
    killed = [p for n, p in ours if p is not None and (st.ours(n, p) or latest.ours(n, p))]
    for pid in killed:
        _stop(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    _stop_watchdogs(layout, st.hosts)
    if st.driver == "qemu":
        from provisioner.farm.qemu import QemuFarm

        QemuFarm(layout.base / "qemu", len(st.hosts)).down()
    layout.state_file.unlink(missing_ok=True)
    return was_up


def _stop_watchdogs(layout: FarmLayout, hosts: list[str]) -> None:
    """The hosts' watchdogs outlive agent restarts (agents start them in their own session): stop them."""
    from ha.watchdog import lock_file, stop_watchdog

    for h in hosts:  # the farm's config leaves ha.run_dir at its default, <shared_dir>/run/agents
        stop_watchdog(lock_file(layout.shared / "run" / "agents", h))


def _redis_answers(url: str) -> bool:
    import redis

    from provisioner.state.store import StateStore

    try:
        store = StateStore.from_url(url)
        try:
            store.ping()
        finally:
            store.close()
    except (DynvmError, redis.exceptions.RedisError):
        return False
    return True


def farm_status(layout: FarmLayout) -> dict[str, Any]:
    """What runs, as proven by pid + identity, and whether Redis answers; ``healthy`` only if all do."""
    st = layout.read_state()
    if st is None or not st.supervisor_up():
        out: dict[str, Any] = {"up": False, "dir": str(layout.base)}
        if st is not None and st.last_error:
            out["last_error"] = st.last_error
        return out
    procs = {
        name: {"pid": pid, "alive": st.ours(name, pid), "restarts": st.restarts.get(name, 0)}
        for name, pid in st.children.items()
    }
    answers = _redis_answers(st.redis_url)
    redis_row: dict[str, Any] = {"answers": answers, "restarts": st.restarts.get("redis", 0)}
    if st.own_redis:
        redis_row |= {"pid": st.redis_pid, "alive": st.ours("redis", st.redis_pid)}
    out = {
        "up": True,
        "healthy": answers and all(p["alive"] for p in procs.values()),
        "dir": str(layout.base),
        "driver": st.driver,
        "hosts": st.hosts,
        "redis_url": redact(st.redis_url),
        "redis": redis_row,
        "supervisor_pid": st.supervisor_pid,
        "processes": procs,
        "config": str(layout.config_file),
    }
    if st.retired:
        out["retired_hosts"] = st.retired
    if st.last_error:
        out["last_error"] = st.last_error
        out["last_error_at"] = datetime.fromtimestamp(st.last_error_at, UTC) if st.last_error_at else None
    return out


def default_layout(base: Path | None = None) -> FarmLayout:
    """The farm at ``base`` (--dir), else $DYNVM_FARM_DIR or the default.  A path that exists as something
    other than a directory (or lies under such a thing) is refused in one line naming it."""
    from provisioner.config import farm_dir
    from provisioner.errors import UsageError

    layout = FarmLayout(base or farm_dir())
    for p in (layout.base, *layout.base.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise UsageError(f"farm directory {layout.base}: {p} exists and is not a directory")
            break
    return layout
