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
    children = _host_children(st, host)
    pids = [p for pid in children.values() for p in (pid, *descendants(pid))]
    watchdog = watchdog_pid(layout, host)
    if watchdog is not None and watchdog not in pids:
        pids.append(watchdog)
    # The death's time is the first signal's, not the start of this call: finding the processes (a /proc
    # walk, the watchdog's lock from the configuration) took ~0.1 s, a window in which the agent could
    # still renew its lease, and failover benchmarks count from killed_at.
    killed_at = time.time()
    marker.write_text(f"{killed_at:.6f}\n")  # first: the supervisor must not restart what dies next
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


# ---- network isolation (issue 10: a host cut off from Redis AND its peers while its guests keep running) --
#
# A farm's agents, monitors and Redis are the supervisor's children and share its network namespace (the
# root one, for `farm up` run by hand), talking over loopback; so a host is cut off by what its agent's
# packets carry, with iptables rules in a chain of its own (one chain per farm and host, in the agents'
# namespace, matching only that agent's traffic):
#   - the agent (with its threads and children) moves into a cgroup v2 group of its own and every packet of a
#     socket it creates from then on is dropped (``-m cgroup --path``: new Redis connections never open);
#   - the TCP connections it already holds are black-holed by their exact 4-tuple, both directions (a real
#     cut: its calls hang until their socket timeout, nothing is reset);
#   - its UDP peer heartbeats are dropped both ways by its peer port (it hears nobody, nobody hears it).
# libvirtd, virtlockd and the guests are untouched: the guests keep running and the agent still reaches its
# libvirtd over a unix socket, so whatever happens to the guests next is the agent's own doing (self-fence).
# ``farm_rejoin_network`` removes the chain and moves the processes back.

ISOLATE_TOOLS = ("iptables", "nsenter")


def _iso_names(layout: FarmLayout, host: str) -> tuple[str, str]:
    """(iptables chain, cgroup v2 group) of ``host``'s isolation; the farm's path in both keeps two farms
    on one machine apart.  A chain name is at most 28 characters."""
    import hashlib

    tag = hashlib.sha256(str(layout.base.resolve()).encode()).hexdigest()[:8]
    return f"DVISO-{tag}-{host}"[:28], f"dynvm-isolate-{tag}-{host}"


def _cgroup2_root() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise UnavailableError("farm isolate: no cgroup v2 hierarchy is mounted (it marks the agent's sockets)")


def _netns_of(st: FarmState, verb: str) -> str:
    """The network namespace of the farm's agents: the supervisor's (they are its children)."""
    if not st.supervisor_up() or st.supervisor_pid is None:
        raise UnavailableError(f"farm {verb}: the farm's supervisor is not running")
    return f"/proc/{st.supervisor_pid}/ns/net"


def _iptables(netns: str, *args: str, check: bool = True) -> bool:
    import subprocess

    argv = ["nsenter", f"--net={netns}", "--", "iptables", "-w", "5", *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and p.returncode != 0:
        raise UnavailableError(f"farm isolate: iptables {' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p.returncode == 0


def _tcp_connections(pid: int) -> list[tuple[str, int, str, int]]:
    """The established TCP connections (local ip, port, remote ip, port) of process ``pid``'s sockets,
    read from its own view of its network namespace (IPv4; the farm uses 127.0.0.1)."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])

    def addr(text: str) -> tuple[str, int]:
        ip_hex, port_hex = text.split(":")
        ip = ".".join(str(b) for b in reversed(bytes.fromhex(ip_hex)))
        return ip, int(port_hex, 16)

    out = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[9] in inodes and f[3] == "01":  # 01 = ESTABLISHED
            out.append((*addr(f[1]), *addr(f[2])))
    return out


def farm_isolate(layout: FarmLayout, host: str) -> dict[str, Any]:
    """Cut ``host`` off from Redis and from its peers while its guests keep running (see above).
    Idempotent: an isolated host's chain is rebuilt."""
    st = _running(layout, host)
    netns = _netns_of(st, "isolate")
    name = f"agent-{host}"
    pid = st.children.get(name)
    if pid is None or not st.ours(name, pid):
        raise UnavailableError(f"farm isolate {host}: its agent is not running")
    if os.readlink(f"/proc/{pid}/ns/net") != os.readlink(netns):
        raise UnavailableError(f"farm isolate {host}: its agent is not in its supervisor's network namespace")
    from provisioner.configload import load_config

    hc = load_config(layout.config_file).host(host)
    peer_port = int(hc.peer_address.rsplit(":", 1)[1]) if hc is not None and hc.peer_address else None
    chain, group = _iso_names(layout, host)
    cg = _cgroup2_root() / group
    cg.mkdir(exist_ok=True)
    (cg / "cgroup.procs").write_text(f"{pid}\n")  # the whole process; its later children follow
    conns = _tcp_connections(pid)
    if not _iptables(netns, "-N", chain, check=False):
        _iptables(netns, "-F", chain)
    rules: list[list[str]] = [["-m", "cgroup", "--path", group]]
    for lip, lport, rip, rport in conns:
        rules.append(["-p", "tcp", "-s", lip, "--sport", str(lport), "-d", rip, "--dport", str(rport)])
        rules.append(["-p", "tcp", "-s", rip, "--sport", str(rport), "-d", lip, "--dport", str(lport)])
    if peer_port is not None:
        rules += [["-p", "udp", "--sport", str(peer_port)], ["-p", "udp", "--dport", str(peer_port)]]
    for rule in rules:
        _iptables(netns, "-A", chain, *rule, "-j", "DROP")
    if not _iptables(netns, "-C", "OUTPUT", "-j", chain, check=False):
        _iptables(netns, "-I", "OUTPUT", "1", "-j", chain)
    return {"host": host, "isolated_at": time.time(), "agent": pid, "connections": len(conns),
            "peer_port": peer_port, "chain": chain}


def farm_rejoin_network(layout: FarmLayout, host: str) -> dict[str, Any]:
    """Undo :func:`farm_isolate`: the chain goes, the processes move back to the root cgroup.  Idempotent."""
    st = _running(layout, host)
    netns = _netns_of(st, "rejoin-network")
    chain, group = _iso_names(layout, host)
    while _iptables(netns, "-D", "OUTPUT", "-j", chain, check=False):
        pass
    _iptables(netns, "-F", chain, check=False)
    _iptables(netns, "-X", chain, check=False)
    root = _cgroup2_root()
    cg = root / group
    moved = 0
    if cg.is_dir():
        for line in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # gone meanwhile
                (root / "cgroup.procs").write_text(f"{line}\n")
                moved += 1
        with contextlib.suppress(OSError):
            cg.rmdir()
    return {"host": host, "rejoined_at": time.time(), "moved_back": moved}
