"""Never two copies (issue #10), witnessed on shared storage.

Each service guest (images/build/guest/service.sh) appends ``W <boot id> <seq> <uptime>`` to /data/witness
on its own data disk every 0.2 s once the file exists: a file of 512-byte slots whose slot 0 holds the next
free slot, read back from the disk (direct I/O) before every append.  The data disk is a qcow2 file on the
farm's shared storage, the one disk every copy of that VM would write, so two copies running at once would
interleave their records in it.  The test reads it from the host side (qemu-img convert -U, debugfs).

A round: cut the host carrying a service off from Redis AND its peers while its guests keep running
(``farm_isolate``: the agent's packets dropped in the farm's network namespace, libvirtd and the guests
untouched).  Its agent must self-fence (destroy its HA guests before its lease can end) and the monitors
bring the services back on survivors.  The witness must show the old boot kept writing after the cut (the
guest really ran on), then the new boot, never two boot ids interleaved.  The network heals, the operator
rejoins the host, next round.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ha.leader import LeaderLease
from ha.recovery import RecoveryStore, Step
from ha.world import RedisWorld
from provisioner.agent.domain import overlay_paths
from provisioner.control.client import ENDED, choose_image, release, submit, wait
from provisioner.control.execjob import exec_in_vm
from provisioner.errors import ConflictError
from provisioner.farm.hostkill import farm_isolate, farm_rejoin_network
from provisioner.hypervisor.libvirt_host import LibvirtHost
from provisioner.interfaces import DomainState
from provisioner.model import HostState, Instance, InstanceState
from tests.conftest import wait_until
from tests.ha_qemu.conftest import HAFarm

ROUNDS = int(os.environ.get("DYNVM_WITNESS_ROUNDS", "5"))
SLOTS = 4096  # 2 MiB: at about 4 records a second, a quarter of an hour per service
SLOT = 512


@dataclass(frozen=True, slots=True)
class Record:
    boot: str
    seq: int


def mark(blob: bytes) -> int:
    """The header: the next free slot (1 for a fresh file)."""
    digits = bytes(c for c in blob[:SLOT] if 0x30 <= c <= 0x39)
    return int(digits) if digits else 1


def parse(blob: bytes, upto: int | None = None) -> list[Record | None]:
    """The witness file's records in slot order, up to the header's mark (or ``upto``); None: a slot
    below it that holds no record, i.e. a lost append."""
    nxt = mark(blob) if upto is None else upto
    out: list[Record | None] = []
    for i in range(1, nxt):
        f = blob[i * SLOT:(i + 1) * SLOT].replace(b"\0", b" ").decode("ascii", "replace").split()
        out.append(Record(f[1], int(f[2])) if len(f) >= 3 and f[0] == "W" and f[2].isdigit() else None)
    return out


def problems(records: Sequence[Record | None]) -> list[str]:
    """What shows two writers (or a lost write): a boot id seen again after another one wrote, a boot's
    own sequence not 1, 2, 3... without a gap, a missing record."""
    out: list[str] = []
    done: set[str] = set()
    cur: Record | None = None
    for pos, r in enumerate(records, 1):
        if r is None:
            out.append(f"slot {pos}: no record")
            continue
        if cur is None or r.boot != cur.boot:
            if r.boot in done:
                out.append(f"slot {pos}: boot {r.boot} writes again after another boot wrote (interleaved)")
            if cur is not None:
                done.add(cur.boot)
            if r.seq != 1:
                out.append(f"slot {pos}: boot {r.boot} starts at seq {r.seq}, not 1 (records lost)")
        elif r.seq != cur.seq + 1:
            out.append(f"slot {pos}: boot {r.boot} seq {cur.seq} -> {r.seq}")
        cur = r
    return out


def boots(records: Sequence[Record | None]) -> list[str]:
    """Distinct boot ids in order of first appearance."""
    seen: list[str] = []
    for r in records:
        if r is not None and r.boot not in seen:
            seen.append(r.boot)
    return seen


def test_the_witness_check_sees_two_writers_and_lost_records() -> None:
    """The check itself (no farm): what a second copy would leave behind is caught."""
    a = [Record("a", 1), Record("a", 2), Record("b", 1), Record("b", 2)]
    assert problems(a) == [] and boots(a) == ["a", "b"]
    assert problems([Record("a", 1), Record("b", 1), Record("a", 2)])  # interleaved
    assert problems([Record("a", 1), Record("a", 3)])  # a record of a's overwritten
    assert problems([Record("a", 1), Record("b", 2)])  # b's first record overwritten
    assert problems([Record("a", 1), None])
    blob = b"3".ljust(SLOT) + b"W a 1 1.0".ljust(SLOT) + b"W a 2 1.2".ljust(SLOT) + b"W a 3 1.4".ljust(SLOT)
    assert parse(blob) == [Record("a", 1), Record("a", 2)]  # slot 3 is past the mark: not yet appended
    assert parse(blob, 2) == [Record("a", 1)]
    assert parse(b"3".ljust(SLOT) + b"W a 1 1.0\n".ljust(SLOT, b"\0")) == [Record("a", 1), None]


# ---- the QEMU farm -------------------------------------------------------------------------------------


def _dump(data: Path) -> bytes:
    with tempfile.TemporaryDirectory(prefix="dynvm-witness-") as tmp:
        raw = Path(tmp) / "data.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(data), str(raw)],
                       check=True, capture_output=True, timeout=120)
        p = subprocess.run(["debugfs", "-R", "cat /witness", str(raw)], check=True, capture_output=True,
                           timeout=120)
    return p.stdout


def read_witness(farm: HAFarm, inst: Instance) -> list[Record | None]:
    """The witness as the shared storage holds it (the guest writes with direct I/O, so its page cache
    plays no part; -U: the running QEMU holds the image's lock).  A copy of a live image is no snapshot
    (seen: the header read after an append, the slot before it), so: the header from a first copy, the
    records from a second one taken after it (every slot below that header was written before it)."""
    data = overlay_paths(farm.rt, inst)[1]
    upto = mark(_dump(data))
    return parse(_dump(data), upto)


def guest_complaints(farm: HAFarm, inst: Instance) -> list[str]:
    """What the guest's witness loop reported on its serial console (a failed write), on any host."""
    out = []
    for log in sorted((farm.layout.base / "qemu" / "hosts").glob(f"*/serial/{inst.domain_name}.log")):
        out += [line for line in log.read_text(errors="replace").splitlines() if "DYNVM_WITNESS" in line]
    return out


def story(farm: HAFarm, iid: str, since: str) -> list[str]:
    """For a failure message: the instance's events since ``since``, and the hosts' fencing events."""
    kinds = ("host", "fenc", "self", "storage", "lease")
    return [f"{e.ts} {e.kind} {e.host or '-'} {e.message[:200]}"
            for e in farm.rt.store.read_events(count=5000, since_id=since)
            if e.instance == iid or (e.instance is None and e.kind.startswith(kinds))]


def guest_boot_id(farm: HAFarm, inst: Instance) -> str:
    out = exec_in_vm(farm.rt, inst.id, ["cat", "/proc/sys/kernel/random/boot_id"], 60)
    assert out["exit_code"] == 0, out
    return str(out["stdout"]).strip()


def rejoined(farm: HAFarm, host: str) -> bool:
    store = farm.rt.store
    if not store.lease_alive(host):
        return False
    cur = store.require_host(host)
    if cur.state in (HostState.DEAD, HostState.FENCED):
        with contextlib.suppress(ConflictError):  # it moved meanwhile: look again
            store.set_host_state(host, HostState.UP, expected=cur.state, reason="test rejoin", operator=True)
        return False  # look again: the monitor may declare it dead once more before it renews
    rec = RecoveryStore(store.r, store.keys.prefix).get(host)
    return cur.state is HostState.UP and (rec is None or rec.step is Step.CLOSED)


def host_uri(farm: HAFarm, host: str) -> str:
    hc = farm.rt.config.host(host)
    assert hc is not None
    return hc.uri


@pytest.fixture
def ha_armed(hafarm: HAFarm) -> Iterator[None]:
    RedisWorld(hafarm.rt).resume()
    wait_until(lambda: LeaderLease(hafarm.rt.store.r, hafarm.rt.store.keys.prefix, "t", 1.0).current(),
               timeout=60, what="a leader monitor")
    yield


@pytest.mark.qemu
@pytest.mark.redis
@pytest.mark.libvirt
def test_isolated_hosts_self_fence_and_the_witness_never_shows_two_copies(hafarm: HAFarm,
                                                                           ha_armed: None) -> None:
    rt = hafarm.rt
    store = rt.store
    recs = RecoveryStore(store.r, store.keys.prefix)
    insts = []
    for image, name, ip in (("se", "se-witness", "10.77.0.60"), ("wms", "wms-witness", "10.77.0.61")):
        img, _ = choose_image(rt, image, None)
        inst, _ = submit(rt, img, None, service=name, ip=ip, host="hv1")
        insts.append(inst)
    for i in insts:
        done = wait(rt, i.id, 300)
        assert done.state is InstanceState.READY, done.reason
        make = (f"dd if=/dev/zero of=/data/witness.new bs={SLOT} count={SLOTS} 2>/dev/null && sync && "
                "mv /data/witness.new /data/witness && sync")
        assert exec_in_vm(rt, i.id, ["sh", "-c", make], 120)["exit_code"] == 0
    for i in insts:
        wait_until(lambda i=i: len(read_witness(hafarm, i)) >= 3, timeout=60, interval=0.5,
                   what=f"{i.id}'s first witness records")
    failovers = {i.id: 0 for i in insts}
    try:
        for rnd in range(ROUNDS):
            target = store.require_instance(insts[rnd % len(insts)].id)
            victim = target.host
            assert victim is not None
            moving = [store.require_instance(i.id) for i in insts]
            moving = [m for m in moving if m.host == victim]
            before = {m.id: read_witness(hafarm, m) for m in moving}
            old_boot = {m.id: boots(before[m.id])[-1] for m in moving}
            mark = store.last_event_id()
            sec, usec = store.r.time()
            t0 = sec + usec / 1e6
            cut = farm_isolate(hafarm.layout, victim)
            try:
                def closed(victim: str = victim, t0: float = t0) -> bool:
                    r = recs.get(victim)
                    return r is not None and r.step is Step.CLOSED and r.times.get("open", 0) >= t0

                wait_until(closed, timeout=300, interval=0.2, what=f"round {rnd}: {victim}'s recovery")
                for m in moving:
                    now = store.require_instance(m.id)
                    assert now.state is InstanceState.READY and now.host not in (None, victim), \
                        (now, story(hafarm, m.id, mark))
                    failovers[m.id] += 1
                # The isolated host's copies are gone (self-fenced: its libvirtd was never touched).
                conn = LibvirtHost(host_uri(hafarm, victim))
                try:
                    for m in moving:
                        assert conn.state(m.domain_name) is not DomainState.RUNNING
                finally:
                    conn.close()
                st = hafarm.layout.read_state()
                assert st is not None and st.children.get(f"agent-{victim}") == cut["agent"], \
                    "the isolated agent must have lived through the cut (it self-fenced, nobody killed it)"
                for m in moving:
                    recs_now = wait_until(
                        lambda m=m, old=old_boot[m.id]: (w := read_witness(hafarm, m))
                        and boots(w)[-1] != old and w,
                        timeout=60, interval=0.5, what=f"round {rnd}: {m.id}'s new boot in the witness")
                    assert problems(recs_now) == [], (problems(recs_now), guest_complaints(hafarm, m))
                    n0 = sum(1 for r in before[m.id] if r is not None and r.boot == old_boot[m.id])
                    n1 = sum(1 for r in recs_now if r is not None and r.boot == old_boot[m.id])
                    assert n1 > n0, f"{m.id}: the old copy stopped writing at the cut ({n0} -> {n1})"
            finally:
                farm_rejoin_network(hafarm.layout, victim)
            # The operator rejoins the host once its agent holds its lease again (rejoined earlier, a host
            # whose agent has not renewed yet is declared dead again at once; left fenced, the next round's
            # death would make half the farm dead: the storm guard would hold it).
            wait_until(lambda v=victim: rejoined(hafarm, v), timeout=120, interval=0.2,
                       what=f"round {rnd}: {victim} up with its lease and no open recovery")
            # For the log (-s): what the isolated host's agent recorded once Redis was back ("self_fenced",
            # or "self_fence_paused" when its peers came back before Redis did).  Not asserted: that record
            # is the agent's observability, not the guarantee under test.
            kinds = [e.kind for e in store.read_events(count=5000, since_id=mark) if e.host == victim]
            print(f"round {rnd}: {victim} isolated; its events since: {sorted(set(kinds))}")
        for i in insts:
            final = read_witness(hafarm, store.require_instance(i.id))
            assert problems(final) == [], (problems(final), guest_complaints(hafarm, i))
            assert len(boots(final)) >= 1 + failovers[i.id], (boots(final), failovers)  # + restarts in place
            assert boots(final)[-1] == guest_boot_id(hafarm, i)
        assert sum(failovers.values()) >= ROUNDS
    finally:
        st = hafarm.layout.read_state()
        for h in st.hosts if st is not None else []:
            farm_rejoin_network(hafarm.layout, h)
        for i in insts:
            release(rt, i.id)
        for i in insts:
            wait(rt, i.id, 120, until=ENDED)
