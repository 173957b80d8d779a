"""Redis Sentinel for real: a master, a replica and three sentinels (Debian's redis-sentinel) on private
ports; dynvm's state store, control workers, agents and clients all use a ``sentinel://`` URL, and the
master is killed in the middle of provisioning.  Nothing may be lost, doubled or stuck.

The sentinels rewrite their configuration files, so each lives in the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from provisioner.control.client import choose_image, submit
from provisioner.control.inventory import host_inventory
from provisioner.errors import ConfigError, TransientError, ValidationError
from provisioner.model import Capacity, Host, InstanceState
from provisioner.redisurl import broker_settings, parse_sentinel, redact
from provisioner.state import StateStore
from tests.conftest import free_port, wait_until
from tests.control.ministack import mini_stack, stack_config

SERVICE = "dynvm"


@dataclass
class SentinelSet:
    base: Path
    ports: dict[str, int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{self.ports[f's{i}']}" for i in range(3))
        return f"sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int:
        s = redis.Redis(port=self.ports["s0"], decode_responses=True, socket_timeout=2)
        addr = cast(tuple[str, int], s.sentinel_get_master_addr_by_name(SERVICE))
        return int(addr[1])

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        out.close()


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False


@pytest.fixture()
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    exe = shutil.which("redis-sentinel")
    if exe is None:
        pytest.fail("redis-sentinel is not installed (deploy/install.sh installs it)")
    base = tmp_path / "sentinel"
    base.mkdir()
    ports = {n: free_port() for n in ("master", "replica", "s0", "s1", "s2")}
    ss = SentinelSet(base, ports)
    try:
        for name in ("master", "replica"):
            d = base / name
            d.mkdir()
            argv = ["redis-server", "--port", str(ports[name]), "--bind", "127.0.0.1", "--dir", str(d)]
            argv += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
            if name == "replica":
                argv += ["--replicaof", "127.0.0.1", str(ports["master"])]
            ss.procs[name] = _start(argv, base / f"{name}.log")
            wait_until(lambda n=name: _answers(ports[n]), timeout=10, what=f"redis {name}")
        for i in range(3):
            conf = base / f"s{i}.conf"
            conf.write_text(
                f"port {ports[f's{i}']}\nbind 127.0.0.1\ndir {base}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {ports['master']} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            ss.procs[f"s{i}"] = _start([exe, str(conf)], base / f"s{i}.log")

        def ready() -> bool:
            try:
                s = redis.Redis(port=ports["s0"], decode_responses=True, socket_timeout=1)
                replicas = cast(list[Any], s.sentinel_slaves(SERVICE))
                return len(replicas) == 1 and len(cast(list[Any], s.sentinel_sentinels(SERVICE))) == 2
            except redis.exceptions.RedisError:
                return False

        def in_sync() -> bool:
            info = redis.Redis(port=ports["replica"], socket_timeout=1).info("replication")
            return info.get("master_link_status") == "up"

        wait_until(in_sync, timeout=30, interval=0.1, what="the replica's first sync")
        wait_until(ready, timeout=30, interval=0.2, what="the sentinels to know the replica and each other")
        yield ss
    finally:
        for proc in ss.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


def test_sentinel_urls_parse_and_never_show_passwords() -> None:
    url = "sentinel://dynvm:s3cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/cluster-a/2?sentinel_password=sp4ss"
    t = parse_sentinel(url)
    assert t.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (t.service, t.db, t.username, t.password, t.sentinel_password) == (
        "cluster-a",
        2,
        "dynvm",
        "s3cret",
        "sp4ss",
    )
    shown = redact(url)
    assert "s3cret" not in shown and "sp4ss" not in shown and "10.0.0.2" in shown
    broker, opts = broker_settings(url)
    assert broker.count("sentinel://") == 3 and broker.endswith("/2")
    assert opts == {"master_name": "cluster-a", "sentinel_kwargs": {"password": "sp4ss"}}
    for bad in ("sentinel://h:1", "sentinel://h:99999/s", "sentinel://h:1/s/x", "sentinel://:pw@h:1/s?x=1"):
        with pytest.raises(ValidationError) as err:
            parse_sentinel(bad)
        assert "pw" not in str(err.value).replace("pw@", "")
    with pytest.raises(ConfigError, match="redis_url"):
        from provisioner.configload import load_config

        f = Path(os.environ.get("TMPDIR", "/tmp")) / f"dynvm-sentinel-{os.getpid()}.yaml"
        f.write_text("redis_url: 'sentinel://:topsecret@h:1'\n")
        try:
            load_config(f)
        finally:
            f.unlink()


def test_unreachable_sentinels_are_a_clear_error() -> None:
    url = f"sentinel://:topsecret@127.0.0.1:{free_port()}/{SERVICE}"
    store = StateStore.from_url(url)
    with pytest.raises(TransientError) as err:
        store.ping()
    assert "topsecret" not in str(err.value) and "127.0.0.1" in str(err.value)


def test_the_store_and_the_broker_follow_the_sentinels(sentinels: SentinelSet) -> None:
    from provisioner.config import Config
    from provisioner.messaging import make_app

    store = StateStore.from_url(sentinels.url)
    store.r.set("dynvm:probe", "1")
    assert redis.Redis(port=sentinels.ports["master"]).get("dynvm:probe") == b"1"
    conf = make_app(Config(redis_url=sentinels.url)).conf
    assert conf.broker_transport_options["master_name"] == SERVICE
    assert conf.broker_transport == "provisioner.messaging:SentinelTransport"  # survives a failover
    # A master that refuses writes for want of replicas (min-replicas-to-write, against split brain): a
    # retryable error too, and the store asks the sentinels again.
    master = redis.Redis(port=sentinels.ports["master"])
    master.config_set("min-replicas-to-write", 2)
    try:
        with pytest.raises(TransientError, match="refuses writes"):
            store.register_host(Host("hv1", "test:///default", capacity=Capacity(1, 1)))
    finally:
        master.config_set("min-replicas-to-write", 0)
    store.register_host(Host("hv1", "test:///default", capacity=Capacity(1, 1)))
    # A write that reaches a replica (a master demoted by a failover) is a retryable error, not a crash.
    replica = StateStore.from_url(f"redis://127.0.0.1:{sentinels.ports['replica']}/0")
    with pytest.raises(TransientError, match="read-only"):
        replica.register_host(Host("hv1", "test:///default", capacity=Capacity(1, 1)))


def switchover(ss: SentinelSet) -> None:
    """A planned switchover as deploy/dynvm.example.yaml describes it: writes paused on the old master,
    SENTINEL FAILOVER, the old master made a replica of the new one at once, writes resumed.  (A bare
    SENTINEL FAILOVER leaves the old master accepting writes from connected clients until sentinel demotes
    it, up to ~10 s later, and those writes are lost: Redis replication is asynchronous.)"""
    old = redis.Redis(port=ss.ports["master"], socket_timeout=5)
    old.execute_command("CLIENT", "PAUSE", "15000", "WRITE")  # type: ignore[no-untyped-call]
    sentinel = redis.Redis(port=ss.ports["s1"], socket_timeout=5)
    sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)  # type: ignore[no-untyped-call]
    wait_until(
        lambda: ss.master_port() == ss.ports["replica"], timeout=30, interval=0.05, what="switch-master"
    )
    old.replicaof("127.0.0.1", ss.ports["replica"])
    old.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]


def test_a_consumer_of_a_demoted_master_sees_a_lost_connection(sentinels: SentinelSet) -> None:
    """A demoted master answers blocked BRPOPs with UNBLOCKED; Celery exits on such a server error, so the
    broker transport must turn it into a lost connection (which Celery survives by reconnecting)."""
    import redis.exceptions as rex
    from kombu.connection import Connection

    from provisioner.config import Config
    from provisioner.messaging import make_app

    conf = make_app(Config(redis_url=sentinels.url)).conf
    conn = Connection(  # type: ignore[no-untyped-call]
        conf.broker_url, transport=conf.broker_transport, transport_options=conf.broker_transport_options
    )
    queue = conn.SimpleQueue("dynvm-probe")  # type: ignore[no-untyped-call]
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            queue.get(block=True, timeout=30)
        except BaseException as err:  # the outcome is what the test checks
            outcome.append(err)

    consumer = threading.Thread(target=consume)
    consumer.start()
    master = redis.Redis(port=sentinels.ports["master"], decode_responses=True)
    wait_until(
        lambda: "brpop" in str(master.execute_command("CLIENT", "LIST")),  # type: ignore[no-untyped-call]
        timeout=10,
        what="the consumer to block",
    )
    master.replicaof("127.0.0.1", sentinels.ports["replica"])  # demoted under the consumer's feet
    consumer.join(timeout=30)
    conn.release()  # type: ignore[no-untyped-call]
    assert outcome and isinstance(outcome[0], rex.ConnectionError), outcome
    assert "UNBLOCKED" in str(outcome[0])


@pytest.mark.slow
@pytest.mark.libvirt
@pytest.mark.parametrize("how", ["kill_master", "switchover"])
def test_provisioning_through_a_master_failover(sentinels: SentinelSet, tmp_path: Path, how: str) -> None:
    cfg = stack_config(tmp_path, sentinels.url, ["hv1", "hv2"], cpus=16)
    with mini_stack(tmp_path / "stack", cfg, workers=2) as stack:
        rt = stack.rt
        img, vo = choose_image(rt, "cms-wn", "cms")
        errors: list[str] = []
        keys = [f"job-{k}" for k in range(24)]

        def settled(which: list[str]) -> bool:
            return all(
                (i := rt.store.instance_for_key(k)) is not None and i.state is InstanceState.READY
                for k in which
            )

        requested: dict[str, str] = {}

        def request(key: str) -> None:
            # A batch hook's behaviour: a transient error is retried with the same idempotency key.
            deadline = time.monotonic() + 60
            while True:
                try:
                    inst, _ = submit(rt, img, vo, owner=key, idempotency_key=key, vcpus=1)
                    requested[key] = inst.id
                    return
                except TransientError as err:
                    errors.append(str(err))
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # not synchronisation: the hook's back-off between retries

        for key in keys[:8]:  # settled before the failover
            request(key)
        wait_until(lambda: settled(keys[:8]), timeout=60, interval=0.2, what="the first wave to be ready")
        old_master = sentinels.master_port()
        assert old_master == sentinels.ports["master"]

        def later_wave() -> None:
            for key in keys[8:]:
                request(key)
                time.sleep(0.1)  # not synchronisation: paces the load so the wave spans the failover

        wave = threading.Thread(target=later_wave)
        wave.start()
        wait_until(lambda: len(requested) >= 12, timeout=60, what="the second wave to start")
        if how == "kill_master":
            sentinels.kill("master")
        else:
            switchover(sentinels)
        wait_until(
            lambda: sentinels.master_port() == sentinels.ports["replica"],
            timeout=60,
            interval=0.2,
            what="the sentinels to promote the replica",
        )
        wave.join(timeout=120)
        assert not wave.is_alive() and set(requested) == set(keys)

        try:
            wait_until(lambda: settled(keys), timeout=180, interval=0.5, what="every request to be ready")
        except AssertionError:
            states = [(i.owner, i.id, i.state.value, i.reason) for i in rt.store.list_instances()]
            raise AssertionError(f"not all ready after the failover: {states}") from None
        # Nothing doubled: one instance per key, and one domain per instance across the hosts.
        owners = Counter(i.owner for i in rt.store.list_instances())
        assert owners == Counter({k: 1 for k in keys}), owners
        domains = Counter(d["instance_id"] for h in stack.hosts for d in host_inventory(rt, h, 30))
        assert domains == Counter({rt.store.instance_for_key(k).id: 1 for k in keys})  # type: ignore[union-attr]
        # Nothing lost for the callers: every id a client was given is the one its key maps to.
        assert {k: rt.store.instance_for_key(k).id for k in keys} == requested  # type: ignore[union-attr]
        # The agents lived through it and renew their leases on the new master.
        assert all(p.poll() is None for p in stack.procs.values()), stack.procs
        seen = {h: rt.store.get_host(h).last_seen for h in stack.hosts}  # type: ignore[union-attr]
        wait_until(
            lambda: all(rt.store.get_host(h).last_seen > seen[h] for h in stack.hosts),  # type: ignore[union-attr]
            timeout=30,
            what="both agents to renew their leases on the new master",
        )
