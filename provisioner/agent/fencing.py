"""The agent's fencing glue: watchdog pets, self-fencing by the quorum rule, storage-lease check.

Three things keep an HA-managed (service) VM from running twice (issue 10, DESIGN.md "Fencing"):

- **Watchdog** (``dynvm watchdog --host NAME``, ha/watchdog.py): a separate process, started here when
  none runs for the host, that outlives agent restarts.  The agent pets it after each successful lease
  renewal (``LeaseKeeper.on_renewed``); a hung agent (SIGSTOP, a deadlock) stops petting and the
  watchdog destroys the host's HA guests ``max(ha.watchdog_s, lease TTL)`` after the last pet.
- **Self-fencing** (ha/fencing.py): peers heartbeat each other over UDP (ha/peers.py).  Each cycle this
  module's own thread — not the lease thread, whose renewal may block for the Redis socket timeout —
  applies ``self_fence_action``: isolated (no renewal for ``TTL - ha.fence_margin_s`` and no peer
  quorum) -> destroy the HA guests and stop petting, before the lease can expire; Redis lost with a
  quorum -> PAUSE (fence nothing, keep petting, logged once).  Events are recorded when Redis is back.
- **Storage leases**: with ``hosts[].virtlockd_pidfile`` set, a dead virtlockd (its running guests' disk
  leases silently gone: FARM-NOTES.md) fences the host's HA guests and stops the pets until it is back.

Decisions are pure (:func:`decide`); :class:`AgentFencing` only carries them out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ha.fencing import Action, Isolation, self_fence_action
from ha.peers import PeerHeartbeat
from ha.watchdog import HA_ROLE, holder, kill_ha_guests, lock_file, pet, pet_file
from provisioner.agent.handover import run_dir
from provisioner.agent.lease import LeaseStats
from provisioner.agent.loops import LoopRecord
from provisioner.config import Config
from provisioner.errors import ConflictError, NotFoundError, UnavailableError
from provisioner.interfaces import DomainState, Hypervisor
from provisioner.model import HostState, InstanceState, Role
from provisioner.state.hosts import Renewal

log = logging.getLogger(__name__)
WATCHDOG_CHECK_S = 2.0  # how often the agent checks its watchdog still runs
FENCED_STATES = frozenset({HostState.DEAD, HostState.FENCED})
LIVE_SERVICE = frozenset({InstanceState.PLACED, InstanceState.BOOTING, InstanceState.READY,
                          InstanceState.DRAINING, InstanceState.MIGRATING})


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action  # NONE, PAUSE or FENCE
    pet: bool  # pet the watchdog in this cycle (renewals pet on their own while NONE)
    why: str


def decide(iso: Isolation, storage_problem: str | None, ttl_s: float, margin_s: float) -> Decision:
    """Storage first (a dead lock manager fences whatever Redis says), then the quorum rule."""
    if storage_problem is not None:
        return Decision(Action.FENCE, False, storage_problem)
    action = self_fence_action(iso, ttl_s, margin_s)
    if action is Action.FENCE:
        why = f"isolated: no lease renewal for {iso.since_renewal_s:.1f} s, "
        return Decision(action, False, why + f"{iso.peers_heard}/{iso.peers_total} peers heard")
    if action is Action.PAUSE:
        heard = f"{iso.peers_heard}/{iso.peers_total}"
        why = f"Redis lost for {iso.since_renewal_s:.1f} s but {heard} peers answer"
        return Decision(action, True, why)
    return Decision(Action.NONE, False, "")


def virtlockd_problem(pidfile: Path | None) -> str | None:
    """None while the host's virtlockd runs (or no check is configured), else why not."""
    if pidfile is None:
        return None
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return f"virtlockd is not running (pid file {pidfile})"
    if not comm.startswith("virtlockd"):
        return f"virtlockd is not running (pid {pid} of {pidfile} is {comm!r})"
    return None


def parse_address(addr: str) -> tuple[str, int]:
    ip, _, port = addr.rpartition(":")
    return ip, int(port)


def start_peers(config: Config, host: str) -> PeerHeartbeat | None:
    """This host's UDP heartbeat to every peer that has a ``peer_address``; None without one of its own."""
    hc = config.host(host)
    if hc is None or hc.peer_address is None:
        return None
    peers = {h.name: parse_address(h.peer_address) for h in config.hosts if h.peer_address and h.name != host}
    try:
        secret = config.ha.peer_secret_file.read_bytes().strip() if config.ha.peer_secret_file else None
    except OSError as err:
        raise UnavailableError(f"ha.peer_secret_file {config.ha.peer_secret_file}: {err.strerror}") from None
    try:
        hb = PeerHeartbeat(host, parse_address(hc.peer_address), peers, config.ha.peer_interval_s, secret)
    except OSError as err:
        raise UnavailableError(f"host {host}: cannot listen for peers on {hc.peer_address}: {err}") from None
    hb.start()
    return hb


def watchdog_wanted(config: Config, host: str) -> bool:
    """Not for libvirt's per-process test driver: another process sees none of the agent's guests."""
    hc = config.host(host)
    return config.ha.watchdog and hc is not None and not hc.uri.startswith("test:")


def spawn_watchdog(config: Config, host: str) -> subprocess.Popen[bytes]:
    """Start ``dynvm watchdog --host NAME`` in its own session, so it outlives this agent."""
    rd = run_dir(config)
    rd.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "provisioner.cli.main"]
    if config.source and not config.source.startswith("<"):
        argv += ["--config", config.source]
    with open(rd / f"{host}.watchdog.log", "ab") as logf:
        return subprocess.Popen(
            [*argv, "watchdog", "--host", host],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


class AgentFencing:
    """One per agent: its own thread decides each cycle; ``on_renewed`` runs in the lease thread."""

    def __init__(self, config: Config, host: str, hv: Hypervisor, store: Any, ttl_s: float) -> None:
        hc = config.host(host)
        assert hc is not None
        self.config, self.host, self.hv, self.store, self.ttl_s = config, host, hv, store, ttl_s
        self.virtlockd_pidfile = hc.virtlockd_pidfile
        self.pet_path: Path = pet_file(run_dir(config), host)
        self.peers: PeerHeartbeat | None = None
        self.last_ok: float | None = None  # monotonic time of the last successful renewal
        self.lease_stats: LeaseStats | None = None  # the keeper's, once it runs (see isolation())
        self.period_s = min(0.5, max(0.05, ttl_s / 10))
        self.stop = threading.Event()
        self.cycles = 0
        self.errors = 0
        self.last_error = ""
        self.last_run = 0.0  # wall clock of the last cycle's end, for provisioner.agent.loops
        self.record = LoopRecord(store.r, store.keys.prefix, host, "fencing")
        self.fenced: list[str] = []  # HA guests destroyed in the current episode
        self.watchdog_starts = 0
        self._episode: tuple[Action, str, float] | None = None  # (action, why, monotonic start)
        self._storage_bad = False
        self._state_fence: str | None = None  # why, while Redis says this host is dead or fenced
        self._lock = threading.Lock()
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_checked = 0.0
        self._thread: threading.Thread | None = None

    # ---- start / stop ----------------------------------------------------------------------------
    def start(self) -> None:
        self.peers = start_peers(self.config, self.host)
        self.last_ok = time.monotonic()  # the lease was just taken
        self.ensure_watchdog()
        self._thread = threading.Thread(target=self.run, name=f"fencing-{self.host}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.peers is not None:
            self.peers.stop()

    def ensure_watchdog(self) -> None:
        """Start the host's watchdog unless one runs (its lock is held); reap ours if it died."""
        if not watchdog_wanted(self.config, self.host):
            return
        if self._watchdog is not None and self._watchdog.poll() is not None:
            log.warning("watchdog %s exited with %s", self.host, self._watchdog.returncode)
            self._watchdog = None
        if holder(lock_file(run_dir(self.config), self.host)) is None and self._watchdog is None:
            self._watchdog = spawn_watchdog(self.config, self.host)
            self.watchdog_starts += 1
            log.warning("watchdog %s: started (pid %d)", self.host, self._watchdog.pid)

    # ---- the lease thread's hook -----------------------------------------------------------------
    def on_renewed(self, outcome: Renewal) -> None:
        now = time.monotonic()
        with self._lock:
            self.last_ok = now
        try:  # one read per renewal: has the monitor or an operator declared this host dead or fenced?
            host = self.store.get_host(self.host)
        except Exception as err:  # Redis flapped right after the renewal: look again at the next one
            log.warning("fencing %s: cannot read the host's state: %s", self.host, err)
        else:
            state = host.state if host is not None else None
            state_why = f"host is {state.value} in Redis" if state in FENCED_STATES and state else None
            with self._lock:
                self._state_fence = state_why
        with self._lock:
            if self._storage_bad or self._state_fence:
                return  # no pet while fenced: the watchdog agrees with the fence
            episode, self._episode = self._episode, None
            fenced, self.fenced = self.fenced, []
        pet(self.pet_path)
        if episode is not None:
            action, why, since = episode
            kind = "self_fenced" if action is Action.FENCE else "self_fence_paused"
            done = f"; destroyed {', '.join(fenced) or 'no HA guest'}" if action is Action.FENCE else ""
            msg = f"{why}{done}; Redis back after {now - since:.1f} s ({outcome.value})"
            log.warning("fencing %s: %s: %s", self.host, kind, msg)
            try:
                self.store.add_event(kind, msg[:300], host=self.host)
            except Exception as err:  # Redis flapped again: keep the episode for the next renewal
                log.warning("fencing %s: cannot record %s: %s", self.host, kind, err)
                with self._lock:
                    self._episode = self._episode or episode
                    self.fenced = fenced + self.fenced
        # This loop's counters, written from here: the fencing thread itself never waits on Redis.
        self.record.write(passes=self.cycles, errors=self.errors, last_error=self.last_error,
                          last_run=self.last_run, every_s=self.period_s)
        if self.peers is not None:  # for the monitor: who still hears whom when a lease lapses
            heard = self.peers.heard_hosts(self.config.ha.peer_timeout_s)
            with contextlib.suppress(Exception):  # advisory; the next renewal reports again
                self.store.report_peers(self.host, heard, 3 * self.ttl_s)

    # ---- the fencing thread ----------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop.wait(self.period_s):
            try:
                self.cycle()
            except Exception as err:  # the loop must outlive any error (libvirt down, a bug)
                self.errors += 1
                self.last_error = f"{type(err).__name__}: {err}"[:300]
                if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                    log.warning("fencing %s: cycle failed (%d so far): %s", self.host, self.errors, err)
            self.last_run = time.time()

    def isolation(self, now: float) -> Isolation:
        heard = self.peers.heard(self.config.ha.peer_timeout_s, now) if self.peers else 0
        total = len(self.peers.peers) if self.peers else 0
        # The lease thread's own stamp is set first thing after a renewal (before hooks and events).
        stamps = [t for t in (self.last_ok, getattr(self.lease_stats, "last_ok", None)) if t is not None]
        last = max(stamps) if stamps else now
        return Isolation(since_renewal_s=now - last, peers_total=total, peers_heard=heard)

    def cycle(self) -> Decision:
        self.cycles += 1
        now = time.monotonic()
        if now - self._watchdog_checked >= WATCHDOG_CHECK_S:
            self._watchdog_checked = now
            self.ensure_watchdog()
        storage = virtlockd_problem(self.virtlockd_pidfile)
        with self._lock:
            by_state = self._state_fence
        if by_state is not None and self._still_fenced():
            self._fence_by_state(by_state)
            return Decision(Action.FENCE, False, by_state)
        iso = self.isolation(now)
        d = decide(iso, storage, self.ttl_s, self.config.ha.fence_margin_s)
        if by_state is not None and storage is None and d.action is Action.NONE:
            # Rejoined (up again in Redis) since the last renewal, which did not pet: pet now, not at the
            # next renewal, or the watchdog, still expired, would destroy an HA guest placed here meanwhile.
            pet(self.pet_path)
            log.warning("fencing %s: %s no more; watchdog petted (last renewal %.1f s ago)",
                        self.host, by_state, iso.since_renewal_s)
        if not self.config.ha.self_fence and storage is None:
            d = Decision(Action.NONE, False, "")  # test-only: the quorum rule is off (ha.self_fence)
        if d.pet:
            pet(self.pet_path)
        # Again each cycle while fenced: nothing HA may come back (a re-driven boot, a late BOOT task).
        killed = kill_ha_guests(self.hv) if d.action is Action.FENCE else []
        if killed:
            log.error("fencing %s: destroyed HA guests %s (%s)", self.host, killed, d.why)
        if storage is not None or self._storage_bad:
            self._storage_transition(storage, killed)
            return d
        with self._lock:
            # A fence is the stronger fact: an episode that fenced stays a fence when peers come back before
            # Redis does (the rule then says pause), so its event still says what was destroyed.
            cur = self._episode[0] if self._episode is not None else None
            if d.action is not Action.NONE and cur is not d.action and cur is not Action.FENCE:
                self._episode = (d.action, d.why, now)
                log.error("fencing %s: %s: %s", self.host, d.action.value, d.why)
            self.fenced += killed
        return d

    def _still_fenced(self) -> bool:
        """Read again (the flag is only as fresh as the last renewal): an operator's rejoin must not cost
        the next VM placed here its life."""
        host = self.store.get_host(self.host)
        if host is not None and host.state in FENCED_STATES:
            return True
        with self._lock:
            self._state_fence = None
        return False

    def _fence_by_state(self, why: str) -> None:
        """The host was declared dead or fenced while this agent still renews its lease (an operator's
        ``dynvm host fence`` of a live host, or a death declared before a late renewal): its HA guests are
        destroyed (again each cycle, so nothing HA comes back here) and then their records marked lost, which
        is what tells the monitor the old copies are gone (ha.engine: a live-leased host's services are
        started elsewhere only once every record there is lost)."""
        killed = kill_ha_guests(self.hv)
        left = [d.name for d in self.hv.list_domains()
                if d.metadata.get("role") == HA_ROLE and d.state in (DomainState.RUNNING, DomainState.PAUSED)]
        if left:
            return  # not provably gone yet: no record says otherwise
        marked = []
        listed = self.store.list_instances(host=self.host)
        if not self._still_fenced():  # rejoined meanwhile: these records may be new placements
            return
        for inst in listed:
            if inst.role is not Role.SERVICE or inst.state not in LIVE_SERVICE:
                continue
            with contextlib.suppress(ConflictError, NotFoundError):  # moved meanwhile: not ours to mark
                self.store.transition_from(inst, InstanceState.LOST, reason=f"{why}: destroyed by its agent")
                marked.append(inst.id)
        if killed or marked:
            msg = f"{why}: destroyed {', '.join(killed) or 'no HA guest'}; lost {', '.join(marked) or '-'}"
            log.error("fencing %s: %s", self.host, msg)
            self.store.add_event("fenced_by_state", msg[:300], host=self.host)

    def _storage_transition(self, problem: str | None, killed: list[str]) -> None:
        """Events for a storage fence at once (Redis is up; that is when it matters) and for its end."""
        with self._lock:
            was, self._storage_bad = self._storage_bad, problem is not None
        if was == self._storage_bad and not killed:
            return
        if problem is None:
            kind, msg = "storage_back", "virtlockd runs again; watchdog petted again"
        else:
            kind, msg = "storage_fenced", f"{problem}; destroyed {', '.join(killed) or 'no HA guest'}"
        log.error("fencing %s: %s: %s", self.host, kind, msg)
        with contextlib.suppress(Exception):
            self.store.add_event(kind, msg[:300], host=self.host)
