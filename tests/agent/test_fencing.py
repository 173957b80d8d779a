"""Self-fencing by the quorum rule, with real parts: a private redis-server we stop and start, real UDP peer
heartbeats (ha/peers.py), the real lease thread and the libvirt test driver holding a service and a worker.

- Redis lost, peers answer: nothing is fenced (HA pauses), the watchdog keeps being petted, and an event
  says so once Redis is back.
- Redis lost and peers silent (isolated): the service guest is destroyed before the lease could expire,
  the worker stays, the pets stop; the event is recorded when Redis is back.
- A dead virtlockd (pid file of a process that is gone / not virtlockd) fences at once and stops the pets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ha.fencing import Action, Isolation
from ha.peers import PeerHeartbeat
from ha.watchdog import last_pet
from provisioner.agent.fencing import AgentFencing, decide, virtlockd_problem
from provisioner.agent.lease import LeaseKeeper
from provisioner.agent.loops import read_loops
from provisioner.config import Config, DetectionClass, HAConfig, HostConfig
from provisioner.hypervisor.domxml import DomainSpec, build_domain_xml
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.hypervisor.testdriver import write_test_host_xml
from provisioner.interfaces import DomainState
from provisioner.model import Capacity, Host, HostState
from provisioner.state import StateStore
from provisioner.state.hosts import Renewal
from tests.conftest import free_port, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]
TTL = 1.5


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test alone: killing it touches nobody else's."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.tmp = free_port(), tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.tmp),
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        r = redis.Redis.from_url(self.url)
        wait_until(lambda: _ping(r), 10, what="private redis")
        r.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _ping(r: object) -> bool:
    import redis

    try:
        return bool(r.ping())  # type: ignore[attr-defined]
    except redis.RedisError:  # not listening yet, or still loading
        return False


@dataclass
class World:
    redis: PrivateRedis
    store: StateStore
    hv: LibvirtHost
    peers: dict[str, PeerHeartbeat]
    keeper: LeaseKeeper
    fencing: AgentFencing

    def running(self) -> dict[str, DomainState]:
        return {d.name: d.state for d in self.hv.list_domains()}

    def events(self, kind: str) -> list[str]:
        return [e.message for e in self.store.read_events(count=1000) if e.kind == kind and e.host == "hv1"]


def start_guest(hv: LibvirtHost, name: str, role: str) -> None:
    spec = DomainSpec(
        name=name,
        uuid=str(uuid.uuid4()),
        domain_type="test",
        vcpus=1,
        memory_mib=256,
        disks=(),
        serial_log=None,
        metadata={"instance_id": name, "role": role, "image": "x:1"},
    )
    hv.define_and_start(name, build_domain_xml(spec))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    red = PrivateRedis(tmp_path)
    red.start()
    uri = write_test_host_xml(tmp_path / "hv1.xml", cpus=8, memory_mib=8192)
    addrs = {h: udp_port() for h in ("hv1", "hv2", "hv3")}
    cfg = Config(
        redis_url=red.url,
        domain_type="test",
        catalogue_dir=tmp_path,
        detection_classes={"t": DetectionClass(lease_ttl_s=TTL, dead_after_s=2.0)},
        hosts=[
            HostConfig(name=h, uri=uri, detection_class="t", peer_address=f"127.0.0.1:{p}")
            for h, p in addrs.items()
        ],
        ha=HAConfig(run_dir=tmp_path / "run", fence_margin_s=0.5, peer_interval_s=0.05, peer_timeout_s=0.4),
    )
    peers = {
        h: PeerHeartbeat(h, ("127.0.0.1", addrs[h]), {"hv1": ("127.0.0.1", addrs["hv1"])}, 0.05)
        for h in ("hv2", "hv3")
    }
    for p in peers.values():
        p.start()
    store = StateStore(red.url)
    store.register_host(Host("hv1", uri, capacity=Capacity(8, 8192)))
    hv = LibvirtHost(uri)
    start_guest(hv, "ce-1", "service")
    start_guest(hv, "wn-1", "worker")
    fencing = AgentFencing(cfg, "hv1", hv, store, TTL)
    keeper = LeaseKeeper(store, "hv1", "tok-hv1", TTL, on_renewed=fencing.on_renewed)
    fencing.start()
    fencing.lease_stats = keeper.stats  # as run_agent wires them
    keeper.start()
    w = World(red, store, hv, peers, keeper, fencing)
    wait_until(lambda: fencing.peers is not None and fencing.peers.heard(0.4) == 2, 10, what="peers heard")
    yield w
    keeper.close()
    fencing.close()
    for p in peers.values():
        p.stop()  # idempotent
    hv.close()
    if red.proc is not None and red.proc.poll() is None:
        red.kill()


def test_decide_table() -> None:
    iso = Isolation
    assert decide(iso(0.2, 2, 0), None, 3.0, 0.5).action is Action.NONE
    assert decide(iso(2.6, 2, 1), None, 3.0, 0.5).action is Action.PAUSE
    assert decide(iso(2.6, 2, 1), None, 3.0, 0.5).pet
    fence = decide(iso(2.6, 2, 0), None, 3.0, 0.5)
    assert fence.action is Action.FENCE and not fence.pet
    storage = decide(iso(0.1, 2, 2), "virtlockd is not running", 3.0, 0.5)
    assert storage.action is Action.FENCE and not storage.pet and "virtlockd" in storage.why


def test_redis_lost_with_peers_up_fences_nothing_and_keeps_petting(world: World) -> None:
    wait_until(lambda: world.keeper.stats.renewals >= 2, 10, what="renewals")
    # The fencing loop's counters reach Redis through the renewals (provisioner/agent/loops.py).
    wait_until(lambda: int(read_loops(world.store.r, world.store.keys.prefix, "hv1")
                           .get("fencing", {}).get("passes", 0)) > 0, 10, what="the fencing loop's record")
    # Who hears whom reaches Redis with the renewals (a monitor tells a Redis-only cut from a death).
    wait_until(lambda: world.store.peer_reports(["hv1", "hv2"]) == {"hv1": ["hv2", "hv3"]}, 10)
    world.redis.kill()
    failures = world.keeper.stats.failures
    wait_until(lambda: world.keeper.stats.failures >= failures + 3, 10, what="failed renewals")
    # Well past the lease TTL without Redis: the service still runs, and the watchdog is still petted.
    last_ok = world.keeper.stats.last_ok
    assert last_ok is not None
    wait_until(lambda: world.fencing.isolation(time.monotonic()).since_renewal_s > 2 * TTL, 10)
    assert world.running() == {"ce-1": DomainState.RUNNING, "wn-1": DomainState.RUNNING}
    pet_before = last_pet(world.fencing.pet_path)
    wait_until(
        lambda: (last_pet(world.fencing.pet_path) or 0) > (pet_before or 0), 5, what="a pet while paused"
    )
    world.redis.start()
    world.store.register_host(Host("hv1", world.hv.uri, capacity=Capacity(8, 8192)))  # empty new Redis
    wait_until(lambda: world.events("self_fence_paused") != [], 10, what="the pause event")
    assert "peers answer" in world.events("self_fence_paused")[0]
    assert world.events("self_fenced") == []
    assert world.running() == {"ce-1": DomainState.RUNNING, "wn-1": DomainState.RUNNING}


def test_isolated_host_destroys_ha_guests_before_its_lease_expires(world: World) -> None:
    wait_until(lambda: world.keeper.stats.renewals >= 2, 10, what="renewals")
    for p in world.peers.values():
        p.stop()
    wait_until(lambda: world.fencing.peers is not None and world.fencing.peers.heard(0.4) == 0, 5)
    world.redis.kill()
    last_ok = world.keeper.stats.last_ok
    assert last_ok is not None
    # Polled: the moment seen here is at or after the real destroy, so this errs against the code.
    wait_until(
        lambda: "ce-1" not in world.running() or world.running()["ce-1"] is not DomainState.RUNNING, 10
    )
    seen = time.monotonic()
    assert seen < last_ok + TTL, f"destroyed {seen - last_ok:.2f} s after the last renewal (lease TTL {TTL})"
    assert world.running().get("wn-1") is DomainState.RUNNING
    # No pets while fenced: the watchdog agrees.
    pet_at = last_pet(world.fencing.pet_path)
    wait_until(lambda: world.fencing.cycles > 10, 5)
    cycles = world.fencing.cycles
    wait_until(lambda: world.fencing.cycles >= cycles + 5, 5)
    assert last_pet(world.fencing.pet_path) == pet_at
    world.redis.start()
    world.store.register_host(Host("hv1", world.hv.uri, capacity=Capacity(8, 8192)))  # empty new Redis
    wait_until(lambda: world.events("self_fenced") != [], 10, what="the self-fence event")
    msg = world.events("self_fenced")[0]
    assert "isolated" in msg and "ce-1" in msg and "0/2 peers" in msg
    assert (last_pet(world.fencing.pet_path) or 0) > (pet_at or 0)  # petted again once renewals succeed


def test_virtlockd_problem_reads_the_pid_file(tmp_path: Path) -> None:
    pidfile = tmp_path / "virtlockd.pid"
    assert virtlockd_problem(None) is None
    assert "not running" in (virtlockd_problem(pidfile) or "")  # no pid file
    pidfile.write_text(str(os.getpid()))  # a live process that is not virtlockd (pid reuse)
    comm = Path(f"/proc/{os.getpid()}/comm").read_text().strip()  # python3.11, or pytest when run as such
    assert f"is '{comm}" in (virtlockd_problem(pidfile) or "")
    sleeper = subprocess.Popen(["sleep", "30"])
    pidfile.write_text(str(sleeper.pid))
    assert virtlockd_problem(pidfile) is not None
    sleeper.kill()
    sleeper.wait()
    assert virtlockd_problem(pidfile) is not None


def test_dead_virtlockd_fences_at_once_and_stops_the_pets(world: World, tmp_path: Path) -> None:
    """A fake virtlockd (a process named virtlockd) whose death the agent sees in its next cycle."""
    fake = tmp_path / "virtlockd"
    fake.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(fake), "60"])
    pidfile = tmp_path / "virtlockd.pid"
    pidfile.write_text(str(proc.pid))
    world.fencing.virtlockd_pidfile = pidfile
    wait_until(lambda: world.fencing.cycles > 3, 5)
    assert world.running()["ce-1"] is DomainState.RUNNING
    proc.kill()
    proc.wait()
    wait_until(lambda: world.running().get("ce-1") is not DomainState.RUNNING, 5, what="service destroyed")
    assert world.running().get("wn-1") is DomainState.RUNNING
    wait_until(lambda: world.events("storage_fenced") != [], 5)
    assert "ce-1" in world.events("storage_fenced")[-1]
    pet_at = last_pet(world.fencing.pet_path)
    renewals = world.keeper.stats.renewals
    wait_until(lambda: world.keeper.stats.renewals >= renewals + 2, 5)
    assert last_pet(world.fencing.pet_path) == pet_at  # renewals go on, the pets do not


def test_a_fence_stays_a_fence_when_peers_come_back_before_redis(world: World) -> None:
    """The quorum rule says pause once the peers answer again, but the guests were already destroyed: the
    event recorded when Redis returns is still ``self_fenced``, naming them (it said "paused", lost them)."""
    wait_until(lambda: world.keeper.stats.renewals >= 2, 10, what="renewals")
    assert world.fencing.peers is not None
    addrs = {h: p._sock.getsockname() for h, p in world.peers.items()}  # where hv1 sends its heartbeats
    hv1 = world.fencing.peers._sock.getsockname()
    for p in world.peers.values():
        p.stop()
    wait_until(lambda: world.fencing.peers is not None and world.fencing.peers.heard(0.4) == 0, 5)
    world.redis.kill()
    wait_until(lambda: world.running().get("ce-1") is not DomainState.RUNNING, 10, what="service destroyed")
    back = {h: PeerHeartbeat(h, addrs[h], {"hv1": hv1}, 0.05) for h in addrs}
    try:
        for p in back.values():
            p.start()
        wait_until(lambda: world.fencing.peers is not None and world.fencing.peers.heard(0.4) == 2, 10,
                   what="peers heard again")
        cycles = world.fencing.cycles
        wait_until(lambda: world.fencing.cycles >= cycles + 3, 5)  # the rule now says pause, several times
        world.redis.start()
        world.store.register_host(Host("hv1", world.hv.uri, capacity=Capacity(8, 8192)))  # empty new Redis
        wait_until(lambda: world.events("self_fenced") != [], 10, what="the self-fence event")
        assert "ce-1" in world.events("self_fenced")[0]
        assert world.events("self_fence_paused") == []
    finally:
        for p in back.values():
            p.stop()


def test_a_rejoined_host_pets_its_watchdog_at_once_not_at_the_next_renewal(tmp_path: Path,
                                                                          redis_url: str) -> None:
    """Declared dead, the agent stops petting (its renewals see the state); an operator's rejoin must pet
    the watchdog within a fencing cycle, or the still-expired watchdog destroys an HA guest placed on the
    host before the next renewal.  No threads: the agent's own hooks are called in their order."""
    uri = write_test_host_xml(tmp_path / "hv1.xml", cpus=8, memory_mib=8192)
    cfg = Config(
        redis_url=redis_url, domain_type="test", catalogue_dir=tmp_path,
        detection_classes={"t": DetectionClass(lease_ttl_s=TTL, dead_after_s=2.0)},
        hosts=[HostConfig(name="hv1", uri=uri, detection_class="t")],
        ha=HAConfig(run_dir=tmp_path / "run", fence_margin_s=0.5),
    )
    store = StateStore(redis_url)
    store.register_host(Host("hv1", uri, capacity=Capacity(8, 8192)))
    hv = LibvirtHost(uri)
    fencing = AgentFencing(cfg, "hv1", hv, store, TTL)
    try:
        fencing.last_ok = time.monotonic()
        fencing.on_renewed(Renewal.RENEWED)
        assert last_pet(fencing.pet_path) is not None  # up: a renewal pets
        fencing.pet_path.unlink()
        store.set_host_state("hv1", HostState.DEAD, expected=HostState.UP, reason="test")
        fencing.on_renewed(Renewal.RENEWED)
        assert fencing.cycle().action is Action.FENCE
        assert last_pet(fencing.pet_path) is None  # dead in Redis: neither renewal nor cycle pets
        store.set_host_state("hv1", HostState.UP, expected=HostState.DEAD, reason="rejoin", operator=True)
        assert fencing.cycle().action is Action.NONE
        assert last_pet(fencing.pet_path) is not None  # petted by the cycle that saw the rejoin
    finally:
        hv.close()
