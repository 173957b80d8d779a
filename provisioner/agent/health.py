"""Health of the service VMs running on this agent's host (ha/health.py has the marks and their rules).

A thread of its own (``HealthLoop``): each tick it reads this host's ready service records and their
health marks, and

- samples each VM by its image version's ``health`` probe every ``interval_s`` (each sample in a small
  pool, given ``timeout_s``; never two samples of one VM at once), counts failures in a row
  (``ha.health.sample``) and writes ``unhealthy`` / ``healthy`` by compare-and-set when the verdict
  changes, with an event that, like the mark's detail, says why the last sample failed.  A probe that
  raises is a failed sample: its exception's one line is that reason, and is logged with the instance
  (once per VM and error text, not on every sample);
- carries out what the leader's keeper asked of a hung VM (mark ``restart`` or ``relocate``): holding the
  instance's boot slot it re-reads the record, moves it ``ready -> stopping`` (the reconciler leaves a
  stopping VM to its stopper), destroys the domain (its disks stay), and only then moves the record
  ``stopping -> lost``, each by compare-and-set on what it read.  A stop left halfway (agent restarted,
  libvirt error) is finished from the record.  The keeper re-places that same record.

On the libvirt test driver (no guest network, no exec channel) every health probe is the domain state.
A paused (``virsh suspend``) domain fails every kind: domain state, TCP, exec and guest agent.

The loop survives every exception (counted) and records its last run and last error in
``PREFIX:health:loop:HOST`` (``last_run``, ``passes``, ``errors``, ``last_error``, ``probing``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ha.health import Counter, Health, HealthStore, Mark, sample
from provisioner.agent.loops import LoopRecord
from provisioner.catalogue.model import Probe
from provisioner.config import DomainType
from provisioner.errors import ConflictError, DynvmError, NotFoundError
from provisioner.model import Instance, InstanceState, Role
from provisioner.probes import DomainStateProbe, ProbeRunner, make_probe
from provisioner.runtime import Runtime, boot_slot, resolve_image

log = logging.getLogger(__name__)
TICK_S = 0.25
STOPPING_WHY = "hung, stopping for "  # the reason of a record this loop is stopping for the keeper
POOL_SIZE = 4


@dataclass
class _Watch:
    """What the loop keeps about one VM at one placement epoch."""

    epoch: int
    probe: Probe
    runner: ProbeRunner
    counter: Counter
    due: float = 0.0
    inflight: Future[bool] | None = None
    error: str = ""  # why its last sample failed (what an unhealthy mark says); "" after a pass
    raised: str = ""  # what its probe last raised, as logged; logged again only once it changes or passed


@dataclass
class LoopStats:
    passes: int = 0
    errors: int = 0
    last_error: str = ""
    last_run: float = 0.0
    stops: list[str] = field(default_factory=list)  # instance ids stopped for the keeper (tests read it)


class HealthLoop:
    def __init__(self, rt: Runtime, tick_s: float = TICK_S) -> None:
        assert rt.host is not None
        self.rt = rt
        self.host = rt.host
        self.tick_s = tick_s
        self.marks = HealthStore(rt.store.r, rt.store.keys.prefix)
        self.stop = threading.Event()
        self.stats = LoopStats()
        self.record = LoopRecord(rt.store.r, rt.store.keys.prefix, self.host, "health")
        self._pool = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix=f"health-{self.host}")
        self._watch: dict[str, _Watch] = {}
        self._stopping: dict[str, Future[None]] = {}
        self._unprobed: dict[str, int] = {}  # id -> epoch found without a usable health probe
        self._thread: threading.Thread | None = None

    # -- the loop ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"health-{self.host}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
                self.stats.passes += 1
            except Exception as err:  # any error: count it, show it, go on next tick
                self.stats.errors += 1
                self.stats.last_error = f"{type(err).__name__}: {err}"[:300]
                log.warning("health %s: pass failed (%d so far): %s", self.host, self.stats.errors, err)
            self.stats.last_run = time.time()
            self._record_stats()
            self.stop.wait(self.tick_s)

    def step(self) -> None:
        """One tick: read this host's ready service VMs and their marks; sample, judge, act."""
        store = self.rt.store
        insts = store.list_instances(host=self.host, state=InstanceState.READY, role=Role.SERVICE)
        # A stop this loop began (before an agent restart, or a failed destroy) is finished from its record.
        stopping = store.list_instances(host=self.host, state=InstanceState.STOPPING, role=Role.SERVICE)
        halfway = [i for i in stopping if i.reason.startswith(STOPPING_WHY)]
        insts = [i for i in insts + halfway if i.host == self.host]
        marks = self.marks.get_many([i.id for i in insts])
        now = time.monotonic()
        for inst in insts:
            h = marks.get(inst.id)
            mark = h.current(inst.epoch) if h is not None else Mark.HEALTHY
            if mark in (Mark.RESTART, Mark.RELOCATE):
                self._watch.pop(inst.id, None)
                self._stop_for_keeper(inst, mark, h)
                continue
            if inst.state is InstanceState.READY:
                self._probe(inst, mark, now)
        seen = {i.id for i in insts}
        for iid in [i for i in self._watch if i not in seen]:
            del self._watch[iid]  # moved, released or lost: its in-flight sample (if any) is dropped
        for iid in [i for i in self._unprobed if i not in seen]:
            del self._unprobed[iid]
        for iid in [i for i, f in self._stopping.items() if f.done()]:
            err = self._stopping.pop(iid).exception()
            if err is not None:  # e.g. libvirt unreachable: counted, shown, tried again next tick
                self.stats.errors += 1
                self.stats.last_error = f"stopping {iid}: {type(err).__name__}: {err}"[:300]
                log.warning("health %s: stopping hung %s failed: %s", self.host, iid, err)

    # -- sampling ----------------------------------------------------------------------------------

    def _runner(self, inst: Instance) -> tuple[Probe, ProbeRunner] | None:
        image = resolve_image(self.rt, inst.image)
        spec = image.spec.health
        if spec is None:
            return None
        hv = self.rt.hypervisor
        assert hv is not None
        domain = inst.domain_name
        if self.rt.config.domain_type is DomainType.TEST:
            return spec, DomainStateProbe(lambda: hv.state(domain))
        from provisioner.agent.domain import exec_socket_path

        runner = make_probe(
            spec,
            domain_state=lambda: hv.state(domain),
            ip=inst.ip,
            netns=self.rt.config.network.probe_netns,
            exec_socket=exec_socket_path(self.rt, inst, self.host),
            sample_timeout=spec.timeout_s,
        )
        return spec, runner

    def _probe(self, inst: Instance, mark: Mark, now: float) -> None:
        w = self._watch.get(inst.id)
        if w is None or w.epoch != inst.epoch:
            if self._unprobed.get(inst.id) == inst.epoch:
                return
            try:
                made = self._runner(inst)
            except DynvmError as err:  # unknown image, a probe this VM cannot have (no ip): say so once
                log.warning("health %s: %s cannot be probed: %s", self.host, inst.id, err)
                made = None
            if made is None:  # no health probe in its image: never judged
                self._watch.pop(inst.id, None)
                self._unprobed[inst.id] = inst.epoch
                return
            spec, runner = made
            w = _Watch(inst.epoch, spec, runner, Counter(inst.epoch, unhealthy=mark is Mark.UNHEALTHY))
            self._watch[inst.id] = w
        if w.inflight is not None:
            if not w.inflight.done():
                return
            ok, raised = _result(w.inflight)
            w.inflight = None
            self._note(inst, w, ok, raised)
            w.counter, change = sample(w.counter, ok, w.probe.failures)
            if change is not None:
                self._write(inst, w, change)
        if now >= w.due:
            w.due = now + w.probe.interval_s
            w.inflight = self._pool.submit(w.runner.check)

    def _note(self, inst: Instance, w: _Watch, ok: bool, raised: str) -> None:
        """Keep why this sample failed.  A probe that raised is logged when its error text is new (a probe
        raising on every sample would write a line every ``interval_s`` for as long as it does)."""
        if ok:
            if w.raised:
                log.info("health %s: %s: %s passes again", self.host, inst.id, w.runner.what)
            w.error = w.raised = ""
            return
        if not raised:
            w.error = getattr(w.runner, "last_error", "") or f"{w.runner.what}: no answer"
            return
        w.error = f"{w.runner.what}: {raised}"
        if raised != w.raised:
            w.raised = raised
            log.warning("health %s: %s: probe %s raised %s (a failed sample; said again when it changes)",
                        self.host, inst.id, w.runner.what, raised)

    def _write(self, inst: Instance, w: _Watch, new: Mark) -> None:
        detail = ""
        if new is Mark.UNHEALTHY:
            detail = w.error or f"{w.runner.what}: no answer"
        expect = frozenset({Mark.HEALTHY}) if new is Mark.UNHEALTHY else frozenset({Mark.UNHEALTHY})
        try:
            self.marks.set(inst.id, state=InstanceState.READY, host=self.host, epoch=inst.epoch,
                           expect=expect, new=new, failures=w.counter.failures, detail=detail)
        except (ConflictError, NotFoundError) as err:
            log.info("health %s: %s not marked %s: %s", self.host, inst.id, new.value, err)
            return
        name = inst.service or inst.id
        if new is Mark.UNHEALTHY:
            text = (f"{name}: {w.counter.failures} {w.probe.type.value} probes failed in a row "
                    f"(every {w.probe.interval_s:g} s, {w.probe.timeout_s:g} s each): {detail}")
        else:
            text = f"{name}: {w.probe.type.value} probe answers again"
        self.rt.store.add_event(f"service_{new.value}", text[:500], instance=inst.id, host=self.host)

    # -- acting for the keeper -------------------------------------------------------------------

    def _stop_for_keeper(self, inst: Instance, mark: Mark, h: Health | None) -> None:
        if inst.id in self._stopping:
            return
        self._stopping[inst.id] = self._pool.submit(self._stop_vm, inst, mark, h.detail if h else "")

    def _stop_vm(self, read: Instance, mark: Mark, why: str) -> None:
        """Destroy the hung VM, then record it lost: only on the record the keeper marked (state, host,
        epoch and mark re-read under the boot slot, so no boot of it runs here meanwhile)."""
        hv = self.rt.hypervisor
        assert hv is not None
        with boot_slot(self.rt, read.id) as free:
            if not free:
                return  # a boot of it runs right now: decided again next tick
            now = self.rt.store.get_instance(read.id)
            h = self.marks.get(read.id)
            if (
                now is None
                or (now.state, now.host, now.epoch) != (read.state, read.host, read.epoch)
                or h is None
                or h.current(now.epoch) is not mark
            ):
                return
            what = "a restart in place" if mark is Mark.RESTART else "a relocation"
            if now.state is InstanceState.READY:
                # Stopping first: the reconciler keeps a stopping record's (absent) domain, where it would
                # take a ready record whose domain just went for a ghost and mark it lost under us.
                try:
                    why_now = f"{STOPPING_WHY}{what}"
                    now = self.rt.store.transition_from(now, InstanceState.STOPPING, reason=why_now)
                except ConflictError as err:  # released or moved meanwhile: not ours to stop
                    log.info("health %s: not stopping %s: %s", self.host, read.id, err)
                    return
            t_destroy = time.monotonic()
            hv.destroy(read.domain_name)
            hv.undefine(read.domain_name)  # its overlay and data disk stay: the same record starts again
            took = time.monotonic() - t_destroy
            try:
                self.rt.store.transition_from(now, InstanceState.LOST, reason=f"hung, stopped for {what}")
            except ConflictError as err:
                log.warning("health %s: %s destroyed but not marked lost: %s", self.host, read.id, err)
                return
        self.stats.stops.append(read.id)
        self.rt.store.add_event(
            "service_stopped",
            f"{read.service or read.id}: hung VM destroyed on {self.host} in {took:.2f} s for {what} "
            f"({why})"[:500],
            instance=read.id,
            host=self.host,
        )
        self.rt.store.notify(read.id)

    # -- observability ------------------------------------------------------------------------------

    def _record_stats(self) -> None:
        st = self.stats
        self.record.write(passes=st.passes, errors=st.errors, last_error=st.last_error, last_run=st.last_run,
                          every_s=self.tick_s, probing=len(self._watch))


def _result(f: Future[bool]) -> tuple[bool, str]:
    """A sample's outcome, with the one line of what its probe raised ("" if it did not)."""
    try:
        return bool(f.result()), ""
    except Exception as err:  # a probe that raised is a failed sample; the caller says why
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return False, (f"{type(err).__name__}: {text}" if text else type(err).__name__)[:300]


