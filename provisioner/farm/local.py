"""``dynvm farm up|down|status``: bring the embedded default up on this machine and find it again."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from provisioner.config import Config, checkout_images_dir
from provisioner.errors import ConflictError, DeadlineExceeded, PermanentError, UnavailableError
from provisioner.farm.layout import FarmLayout, FarmState, pid_alive

HOST_CPUS = 16
HOST_MEMORY_MIB = 32768
UP_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:
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
) -> dict[str, Any]:
    from provisioner.hypervisor.testdriver import write_test_host_xml

    layout.hosts_dir.mkdir(parents=True, exist_ok=True)
    host_entries = []
    for i, h in enumerate(hosts):
        if driver == "test":
            uri = write_test_host_xml(layout.hosts_dir / f"{h}.xml", host_cpus, host_memory_mib)
        else:
            uri = qemu.host_uri(h)
        entry = {"name": h, "uri": uri, "labels": {"rack": f"r{i % 2 + 1}"}, "detection_class": "fast"}
        if qemu is not None:
            entry["migration_uri"] = qemu.migration_uri(h)
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
        # TCG guests mostly idle after boot; the real farm's hosts have 2 cores each.
        "scheduler": {"cpu_overcommit": 1.0 if driver == "test" else 8.0},
        "timeouts": {"visibility_s": 30 if driver == "test" else 300, "reconcile_interval_s": 5},
    }


def farm_up(
    layout: FarmLayout,
    hosts: int,
    driver: str,
    redis_url: str | None = None,
    timeout_s: float = UP_TIMEOUT_S,
    host_cpus: int = HOST_CPUS,
    host_memory_mib: int = HOST_MEMORY_MIB,
) -> FarmState:
    """Start the farm (idempotent: an identical running farm is returned as it is)."""
    if driver not in ("test", "qemu"):
        raise PermanentError(f"--driver {driver!r}: choose test or qemu")
    if not 1 <= hosts <= 64:
        raise PermanentError(f"--hosts {hosts}: choose 1..64")
    if driver == "qemu" and os.geteuid() != 0:
        raise PermanentError("--driver qemu needs root (it starts one libvirtd per host in namespaces)")
    st = layout.read_state()
    if st is not None and pid_alive(st.supervisor_pid):
        if st.driver != driver or len(st.hosts) != hosts:
            raise ConflictError(
                f"a farm is already up in {layout.base} ({st.driver}, {len(st.hosts)} hosts): "
                "run `dynvm farm down` first"
            )
        return st
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
    cfg = _farm_config(layout, driver, names, url, qemu, host_cpus, host_memory_mib)
    Config.model_validate(cfg)  # our own output must be valid; fail here, not in four child processes
    tmp = layout.config_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, layout.config_file)
    st = FarmState(
        driver=driver, hosts=names, redis_url=url, started=time.time(), own_redis=redis_url is None
    )
    layout.write_state(st)
    logf = open(layout.logs / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
    subprocess.Popen(
        [sys.executable, "-m", "provisioner.farm.supervisor", str(layout.base)],
        stdout=logf,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    logf.close()
    try:
        _wait_up(layout, names, timeout_s)
    except Exception:
        farm_down(layout)
        raise
    st2 = layout.read_state()
    assert st2 is not None
    return st2


def _wait_up(layout: FarmLayout, names: list[str], timeout_s: float) -> None:
    from provisioner.state.store import StateStore

    deadline = time.monotonic() + timeout_s
    st = layout.read_state()
    assert st is not None
    store = StateStore.from_url(st.redis_url)
    missing: list[str] = names
    while time.monotonic() < deadline:
        st = layout.read_state()
        if st is not None and st.supervisor_pid and not pid_alive(st.supervisor_pid):
            raise UnavailableError(f"farm supervisor died; see {layout.logs / 'supervisor.log'}")
        try:
            missing = [h for h in names if not store.lease_alive(h)]
        except UnavailableError:
            missing = names
        if not missing:
            return
        time.sleep(0.1)
    raise DeadlineExceeded(
        f"farm not up after {timeout_s:.0f} s: no lease from {', '.join(missing)} (see {layout.logs})"
    )


def farm_down(layout: FarmLayout, timeout_s: float = 60.0) -> bool:
    """Stop the supervisor (which stops everything it started). True if a farm was running."""
    st = layout.read_state()
    if st is None:
        return False
    was_up = pid_alive(st.supervisor_pid)
    if was_up and st.supervisor_pid:
        os.kill(st.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(st.supervisor_pid):
            if time.monotonic() > deadline:
                os.kill(st.supervisor_pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    # Belt and braces: nothing the farm started may outlive it.
    for pid in [*st.children.values(), st.redis_pid]:
        if pid_alive(pid):
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
    if st.driver == "qemu":
        from provisioner.farm.qemu import QemuFarm

        QemuFarm(layout.base / "qemu", len(st.hosts)).down()
    st.children, st.redis_pid, st.supervisor_pid = {}, None, None
    layout.write_state(st)
    layout.state_file.unlink(missing_ok=True)
    return was_up


def farm_status(layout: FarmLayout) -> dict[str, Any]:
    st = layout.read_state()
    if st is None or not pid_alive(st.supervisor_pid):
        return {"up": False, "dir": str(layout.base)}
    procs = {
        name: {"pid": pid, "alive": pid_alive(pid), "restarts": st.restarts.get(name, 0)}
        for name, pid in st.children.items()
    }
    return {
        "up": True,
        "dir": str(layout.base),
        "driver": st.driver,
        "hosts": st.hosts,
        "redis_url": st.redis_url,
        "supervisor_pid": st.supervisor_pid,
        "processes": procs,
        "config": str(layout.config_file),
    }


def default_layout(base: Path | None = None) -> FarmLayout:
    from provisioner.config import farm_dir

    return FarmLayout(base or farm_dir())
