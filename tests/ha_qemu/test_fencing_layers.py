"""Each fencing layer alone keeps a service VM from running twice, on real QEMU guests (issue #10), and an
operator's `dynvm host fence` of a live host stops its service VMs there before they start elsewhere.

The fault: ``isolate`` cuts a host's agent off from Redis and from its peers (iptables rules matching that
agent alone) while libvirtd and its guests keep running — the case fencing exists for.  The layers:

1. self-fencing (the agents' quorum rule, ``ha.self_fence``) + the per-host watchdog (``ha.watchdog``);
2. storage leases: a second start of the same disk is refused by virtlockd (``hosts[].virtlockd_pidfile``:
   a dead virtlockd fences the host).  QEMU's own image lock would refuse first on this one-kernel farm, so
   this case turns on ``ha.share_rw_data_disks`` (test-only: raw data disks with share-rw=on), which takes
   it out of the way — the lease alone refuses;
3. the external fence command (``hosts[].fence_command``; here `dynvm farm kill`, the farm's power switch).

Each test rewrites the farm's configuration to leave one layer on, restarts the agents and monitors (HA
paused meanwhile; an agent restart is no host death) and puts the configuration back afterwards.  The
farm's virtlockd leases cannot be switched off (they are the QEMU hosts' own configuration), so with
layers 1 and 3 (QEMU's image lock on too) the proof is that the old guest's QEMU process was gone before
the new one started: no lock ever had to refuse anything.  Copies are counted from the QEMU processes
themselves (``/proc``, every 20 ms): libvirt is not asked, an isolated or killed host cannot be trusted to
answer.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from ha.leader import LeaderLease
from ha.recovery import Recovery, RecoveryStore, Step
from ha.world import RedisWorld
from provisioner.cli.main import main as cli_main
from provisioner.control.client import ENDED, choose_image, release, submit, wait
from provisioner.farm.hostkill import farm_kill, farm_revive, stop_watchdogs, watchdog_pid
from provisioner.model import HostState, Instance, InstanceState
from tests.conftest import wait_until
from tests.ha_qemu.conftest import HAFarm

pytestmark = [pytest.mark.qemu, pytest.mark.redis, pytest.mark.libvirt]
HOSTS = ["hv1", "hv2", "hv3", "hv4"]
# virtlockd's refusal of a disk lease another host holds (FARM-NOTES.md, tests/farm_qemu/test_lease.py).
LOCKSPACE_BUSY = re.compile(r"resource busy: Lockspace resource '[0-9a-f]{64}' is locked")


# ---- who runs a guest: its QEMU processes --------------------------------------------------------------
class Copies(threading.Thread):
    """Samples the QEMU processes running ``domain`` (libvirt names it in ``-name guest=NAME,...``)."""

    def __init__(self, domain: str) -> None:
        super().__init__(daemon=True)
        self.needle = f"guest={domain},".encode()
        self.stop = threading.Event()
        self.samples = 0
        self.most = 0  # most QEMU processes of the domain alive in one sample
        self.seen: dict[int, tuple[int, int]] = {}  # pid -> (first sample, last sample) it was alive in

    def pids(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"qemu-system" in cmd and self.needle in cmd:
                out.append(int(d))
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            pids = self.pids()
            self.samples += 1
            self.most = max(self.most, len(pids))
            for p in pids:
                first, _ = self.seen.get(p, (self.samples, 0))
                self.seen[p] = (first, self.samples)
            self.stop.wait(0.02)

    def finish(self) -> None:
        self.stop.set()
        self.join(10)

    def handover(self) -> tuple[int, int]:
        """(old, new) pid of a guest that ran once, then once elsewhere; the old one ended first."""
        assert len(self.seen) == 2, self.seen
        (old, (_, old_last)), (new, (new_first, _)) = sorted(self.seen.items(), key=lambda kv: kv[1])
        assert old_last < new_first, f"old QEMU {old} alive to sample {old_last}, new {new} from {new_first}"
        return old, new


# ---- a host cut off from Redis and its peers, its guests running --------------------------------------
# The farm's agents live in the machine's network namespace (Redis and the peer heartbeats on its loopback),
# so the cut is made there, in a chain of this test's own that matches only the isolated agent: its cgroup
# v2 group (every socket it opens from then on), the exact 4-tuples of the TCP connections it holds (both
# ways: a silent cut, nothing is reset) and its UDP peer port (both ways).  Nothing else's packets match.
CHAIN = "DVH5ISO"


def _iptables(*args: str, check: bool = True) -> bool:
    p = subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, timeout=30,
                       check=False)
    assert p.returncode == 0 or not check, p.stderr
    return p.returncode == 0


def _cgroup2() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] == "cgroup2":
            return Path(parts[1])
    raise AssertionError("no cgroup v2 hierarchy mounted")


def _tcp_of(pid: int) -> list[tuple[str, str, str, str]]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])

    def addr(text: str) -> tuple[str, str]:
        ip_hex, port_hex = text.split(":")
        return ".".join(str(b) for b in reversed(bytes.fromhex(ip_hex))), str(int(port_hex, 16))

    out = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[9] in inodes and f[3] == "01":
            out.append((*addr(f[1]), *addr(f[2])))
    return out


def isolate(farm: HAFarm, host: str) -> None:
    st = farm.layout.read_state()
    assert st is not None
    pid = st.children[f"agent-{host}"]
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    hc = farm.rt.config.host(host)
    assert hc is not None and hc.peer_address is not None
    group = _cgroup2() / f"dynvm-h5-isolate-{host}"
    group.mkdir(exist_ok=True)
    (group / "cgroup.procs").write_text(f"{pid}\n")
    _iptables("-N", CHAIN, check=False)
    _iptables("-F", CHAIN)
    _iptables("-A", CHAIN, "-m", "cgroup", "--path", group.name, "-j", "DROP")
    for lip, lport, rip, rport in _tcp_of(pid):
        for a, ap, b, bp in ((lip, lport, rip, rport), (rip, rport, lip, lport)):
            _iptables("-A", CHAIN, "-p", "tcp", "-s", a, "--sport", ap, "-d", b, "--dport", bp, "-j", "DROP")
    port = hc.peer_address.rsplit(":", 1)[1]
    _iptables("-A", CHAIN, "-p", "udp", "--sport", port, "-j", "DROP")
    _iptables("-A", CHAIN, "-p", "udp", "--dport", port, "-j", "DROP")
    if not _iptables("-C", "OUTPUT", "-j", CHAIN, check=False):
        _iptables("-I", "OUTPUT", "1", "-j", CHAIN)


def heal(host: str) -> None:
    while _iptables("-D", "OUTPUT", "-j", CHAIN, check=False):
        pass
    _iptables("-F", CHAIN, check=False)
    _iptables("-X", CHAIN, check=False)
    root = _cgroup2()
    group = root / f"dynvm-h5-isolate-{host}"
    if group.is_dir():
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(f"{pid}\n")
        with contextlib.suppress(OSError):
            group.rmdir()


# ---- the farm, one layer at a time ---------------------------------------------------------------------
def redis_now(farm: HAFarm) -> float:
    sec, usec = farm.rt.store.r.time()
    return sec + usec / 1e6


def _leading(farm: HAFarm) -> bool:
    return LeaderLease(farm.rt.store.r, farm.rt.store.keys.prefix, "t", 1.0).current() is not None


def _restart_agents_and_monitors(farm: HAFarm, watchdog: bool) -> None:
    st = farm.layout.read_state()
    assert st is not None
    old = {n: p for n, p in st.children.items() if n.startswith(("agent-", "monitor-"))}
    t_kill = redis_now(farm)
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    if not watchdog:  # the watchdogs outlive their agents: a layer test without them stops them
        stop_watchdogs(farm.layout, HOSTS)

    def back() -> bool:
        now = farm.layout.read_state()
        if now is None:
            return False
        fresh = all(now.children.get(n) not in (None, p) and now.ours(n, now.children[n])
                    for n, p in old.items())
        # Renewed since the kill: by the new agent (the old lease key outlives its holder by up to a TTL).
        return fresh and all(farm.rt.store.lease_alive(h) and farm.rt.store.require_host(h).last_seen > t_kill
                             for h in HOSTS)

    wait_until(back, timeout=120, interval=0.2, what="agents and monitors restarted on the new configuration")
    if not watchdog:
        # Again: a watchdog its agent had just spawned held no lock yet at the first stop and was missed (seen
        # with a fresh farm: it outlived the restart, the new agents kept petting it, and on isolation it
        # killed the guest — the storage-only case then had the watchdog layer on).  The new agents start
        # none (ha.watchdog false), so by now every old one holds its lock.
        stop_watchdogs(farm.layout, HOSTS)
        assert [h for h in HOSTS if watchdog_pid(farm.layout, h) is not None] == []
    wait_until(lambda: _leading(farm), timeout=60, what="a leader monitor")


@contextmanager
def only_layer(farm: HAFarm, *, watchdog: bool, self_fence: bool, storage_check: bool,
               fence_command: list[str] | None, share_rw: bool = False) -> Iterator[None]:
    path = farm.layout.config_file
    original = path.read_text()
    cfg: dict[str, Any] = yaml.safe_load(original)
    cfg["ha"] = {**(cfg.get("ha") or {}), "watchdog": watchdog, "self_fence": self_fence,
                 "share_rw_data_disks": share_rw}
    for h in cfg["hosts"]:
        if not storage_check:
            h.pop("virtlockd_pidfile", None)
        if fence_command is not None:
            h["fence_command"] = fence_command
    world = RedisWorld(farm.rt)
    world.pause("test: switching fencing layers")
    try:
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        _restart_agents_and_monitors(farm, watchdog)
        world.resume()
        yield
    finally:
        world.pause("test: restoring fencing layers")
        path.write_text(original)
        _restart_agents_and_monitors(farm, True)
        world.resume()


def ready_service(farm: HAFarm, image: str, name: str, ip: str, host: str) -> Instance:
    img, _ = choose_image(farm.rt, image, None)
    inst, _ = submit(farm.rt, img, None, service=name, ip=ip, host=host)
    done = wait(farm.rt, inst.id, 180)
    assert done.state is InstanceState.READY and done.host == host, done.reason
    return done


def recovery_since(farm: HAFarm, host: str, t0: float, step: Step) -> Recovery | None:
    r = RecoveryStore(farm.rt.store.r, farm.rt.store.keys.prefix).get(host)
    if r is None or r.times.get("open", 0) < t0:
        return None
    return r if step.value in r.times else None


def restore_host(farm: HAFarm, host: str) -> None:
    """Network back, then a clean host: kill (if not yet) and revive, state up by operator action."""
    heal(host)
    if not farm.layout.host_down(host):
        farm_kill(farm.layout, host)
    farm_revive(farm.layout, host, timeout_s=120)
    cur = farm.rt.store.require_host(host)
    if cur.state is not HostState.UP:
        farm.rt.store.set_host_state(host, HostState.UP, expected=cur.state, reason="test rejoin",
                                     operator=True)


def release_all(farm: HAFarm, insts: list[Instance]) -> None:
    for i in insts:
        if farm.rt.store.require_instance(i.id).state not in ENDED:
            release(farm.rt, i.id)
    for i in insts:
        wait(farm.rt, i.id, 120, until=ENDED)


def recent(farm: HAFarm, n: int = 60) -> str:
    """The last events, for a failure message."""
    return "\n".join(f"{e.ts} {e.kind} {e.host or '-'} {e.instance or '-'} {e.message[:120]}"
                     for e in farm.rt.store.read_events(count=n))


def failed_over(farm: HAFarm, inst: Instance, host: str, t0: float) -> Instance:
    try:
        wait_until(lambda: recovery_since(farm, host, t0, Step.CLOSED), timeout=240, interval=0.2,
                   what=f"{host}'s recovery to close")
    except AssertionError as err:
        raise AssertionError(f"{err}; last events:\n{recent(farm)}") from None
    new = farm.rt.store.require_instance(inst.id)
    assert new.state is InstanceState.READY and new.host not in (None, host), new
    evs = farm.rt.store.read_events(count=3000)
    moves = [e for e in evs
             if e.kind == "placed" and e.instance == inst.id and e.message == f"failover from {host}"]
    assert len(moves) == 1, moves  # started elsewhere once: no refused start, no retry
    return new


@pytest.fixture(autouse=True)
def ha_running(hafarm: HAFarm) -> Iterator[None]:
    RedisWorld(hafarm.rt).resume()
    wait_until(lambda: _leading(hafarm), timeout=60, what="a leader monitor")
    yield


# ---- the tests ---------------------------------------------------------------------------------------
def test_self_fencing_and_watchdog_alone_prevent_a_second_copy(hafarm: HAFarm) -> None:
    with only_layer(hafarm, watchdog=True, self_fence=True, storage_check=False, fence_command=None):
        ce = ready_service(hafarm, "ce", "ce-layer1", "10.77.0.50", "hv1")
        copies = Copies(ce.domain_name)
        copies.start()
        try:
            t0 = redis_now(hafarm)
            isolate(hafarm, "hv1")
            failed_over(hafarm, ce, "hv1", t0)
            wait_until(lambda: copies.samples > 0 and len(copies.pids()) == 1, timeout=30, what="one copy")
        finally:
            copies.finish()
            restore_host(hafarm, "hv1")
        assert copies.most == 1
        copies.handover()  # the isolated host's guest died (its agent / watchdog) before the new one started
        evs = hafarm.rt.store.read_events(count=3000)
        assert [e for e in evs if e.kind in ("fenced", "fence_failed") and e.host == "hv1"] == []
        release_all(hafarm, [ce])


def test_storage_leases_alone_refuse_a_second_copy(hafarm: HAFarm) -> None:
    """Nobody fences the isolated host: past the deadline the monitor starts the CE elsewhere, and virtlockd
    refuses the disk lease the running copy holds ("resource busy: Lockspace resource '<sha256>' is
    locked").  QEMU's own image lock, which on this one-kernel farm fires first for a qcow2 disk ("Failed to
    get "write" lock"), is out of the way: ``ha.share_rw_data_disks`` gives the CE a raw data disk with
    share-rw=on, so the refusal is the lease's.  libvirt starts QEMU with its vCPUs stopped (-S) and asks
    virtlockd for the leases before resuming them, so each refused QEMU never ran a guest instruction and
    dies at once; the first copy runs throughout."""
    with only_layer(hafarm, watchdog=False, self_fence=False, storage_check=True, fence_command=None,
                    share_rw=True):
        ce = ready_service(hafarm, "ce", "ce-layer2", "10.77.0.51", "hv2")
        copies = Copies(ce.domain_name)
        copies.start()
        try:
            t0 = redis_now(hafarm)
            mark = hafarm.rt.store.last_event_id()
            isolate(hafarm, "hv2")
            wait_until(lambda: copies.samples > 0, timeout=10, what="the sampler")
            (old,) = copies.pids()
            done = wait_until(
                lambda: (i := hafarm.rt.store.require_instance(ce.id)).state is InstanceState.FAILED and i,
                timeout=240, interval=0.2, what="the second start to be refused")
            assert recovery_since(hafarm, "hv2", t0, Step.STARTED) is not None
            assert done.host != "hv2"
            assert LOCKSPACE_BUSY.search(done.reason), done.reason  # virtlockd refused: its lease
            assert "Failed to get" not in done.reason, done.reason  # not QEMU's image lock
            assert copies.pids() == [old]  # the first copy still runs, alone
            last = copies.samples
        finally:
            copies.finish()
            restore_host(hafarm, "hv2")
        first_old, last_old = copies.seen[old]
        assert first_old == 1 and last_old >= last  # the first copy ran in every sample until then
        refused = {p: span for p, span in copies.seen.items() if p != old}
        assert refused, "no second start was attempted"
        assert all(b < last for _, b in refused.values()), refused  # each refused QEMU died long before
        evs = hafarm.rt.store.read_events(count=3000, since_id=mark)
        assert [e for e in evs if e.kind == "ready" and e.instance == ce.id] == []  # never ready twice
        release_all(hafarm, [ce])


def test_the_fence_command_alone_prevents_a_second_copy(hafarm: HAFarm) -> None:
    kill = [sys.executable, "-m", "provisioner.cli.main", "farm", "kill", "--dir", str(hafarm.layout.base)]
    with only_layer(hafarm, watchdog=False, self_fence=False, storage_check=False, fence_command=kill):
        ce = ready_service(hafarm, "ce", "ce-layer3", "10.77.0.52", "hv3")
        copies = Copies(ce.domain_name)
        copies.start()
        try:
            t0 = redis_now(hafarm)
            mark = hafarm.rt.store.last_event_id()
            isolate(hafarm, "hv3")
            failed_over(hafarm, ce, "hv3", t0)
            assert hafarm.layout.host_down("hv3")  # the fence command (farm kill) powered it off
        finally:
            copies.finish()
            restore_host(hafarm, "hv3")
        assert copies.most == 1
        copies.handover()
        evs = hafarm.rt.store.read_events(count=3000, since_id=mark)
        kinds = [(e.kind, e.host) for e in evs
                 if e.kind in ("fenced", "placed") and e.instance in (None, ce.id)]
        assert kinds[0] == ("fenced", "hv3"), kinds  # the command succeeded before anything was placed
        assert [e for e in evs if e.kind in ("self_fenced", "storage_fenced")] == []
        release_all(hafarm, [ce])


def test_operator_fence_of_a_live_host_stops_its_services_there_first(hafarm: HAFarm) -> None:
    ce = ready_service(hafarm, "ce", "ce-opfence", "10.77.0.53", "hv4")
    copies = Copies(ce.domain_name)
    copies.start()
    t0 = redis_now(hafarm)
    try:
        rc = cli_main(["--config", str(hafarm.layout.config_file), "host", "fence", "hv4", "--manual"])
        assert rc == 0
        assert hafarm.rt.store.lease_alive("hv4")  # a live host: its agent still renews
        new = failed_over(hafarm, ce, "hv4", t0)
        wait_until(lambda: len(copies.pids()) == 1, timeout=30, what="one copy")
    finally:
        copies.finish()
        restore_host(hafarm, "hv4")
    assert copies.most == 1
    copies.handover()  # stopped on hv4 by its own agent before it started elsewhere
    evs = hafarm.rt.store.read_events(count=3000)
    here = [e for e in evs if e.kind == "fenced_by_state" and e.host == "hv4"]
    assert here and ce.domain_name in here[-1].message and ce.id in here[-1].message
    assert new.host != "hv4" and (new.mac, new.ip) == (ce.mac, ce.ip)
    release_all(hafarm, [ce])
