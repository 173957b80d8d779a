"""What a control worker or host agent needs at hand, built once at start-up and passed explicitly."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioner.config import Config

if TYPE_CHECKING:
    from provisioner.catalogue.model import ResolvedImage
    from provisioner.catalogue.store import Catalogue
    from provisioner.control.hostsview import HostsView
    from provisioner.interfaces import Hypervisor
    from provisioner.model import Instance
    from provisioner.state.claims import ClaimRequest
    from provisioner.state.store import StateStore


@dataclass
class Runtime:
    config: Config
    store: StateStore
    catalogue: Catalogue
    app: Any = None  # the Celery app (typed Any: celery ships no type hints)
    host: str | None = None  # set in a host agent
    hypervisor: Hypervisor | None = None  # set in a host agent
    lease_token: str = ""  # a host agent's lease token (its identity towards the host's lease)
    booting: set[str] = field(default_factory=set)  # instance ids this agent is booting right now
    # Instance ids whose boot, release or migrate retry the broker refused (provisioner.tasking): the
    # message is gone, so this agent's reconciler re-drives (or settles) them at its next pass.
    lost_retries: set[str] = field(default_factory=set)
    catalogue_mtime: int | None = None  # catalogue signature (directory + files' mtimes) at the last load
    lock: threading.Lock = field(default_factory=threading.Lock)
    hosts_view: HostsView | None = None  # a control worker's short-lived host snapshot (place.py)


def resolve_image(rt: Runtime, ref: str) -> ResolvedImage:
    """Resolve through a catalogue that follows edits: the directory's mtime changes with every atomic
    rename, so a long-running agent or worker reloads when an operator adds or promotes an image.  A bad
    file never fails an image of another family: the reload serves the last good version of what it
    cannot read (Catalogue.load_serving) and reports the bad file as an event."""
    from provisioner.errors import UnknownImageError

    try:
        return current_catalogue(rt).resolve(ref)
    except UnknownImageError:
        # Same-granularity mtime (an edit within the clock tick of our last load): reload once and retry.
        reload_catalogue(rt)
        return rt.catalogue.resolve(ref)


def current_catalogue(rt: Runtime) -> Catalogue:
    """``rt.catalogue``, reloaded first if the catalogue changed on disk since the last load (for long-lived
    processes that pick images, e.g. by VO: they see promotions without a restart)."""
    mtime = _catalogue_signature(rt.config.catalogue_dir)
    if rt.catalogue_mtime != mtime:
        reload_catalogue(rt)
        rt.catalogue_mtime = mtime
    return rt.catalogue


def _catalogue_signature(directory: Path) -> int:
    """Changes with every rename in the directory AND with a file rewritten in place (an editor that does
    not rename): the directory's mtime plus each ``*.yaml`` file's mtime and size."""
    try:
        dir_mtime = directory.stat().st_mtime_ns
        with os.scandir(directory) as it:
            stats = [(e.name, e.stat()) for e in it if e.name.endswith(".yaml")]
        files = sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats)
    except OSError:
        return 0
    return hash((dir_mtime, *files))


def reload_catalogue(rt: Runtime) -> None:
    """Load the catalogue again (serving the last good version of a bad file); each bad file this process
    had not reported yet becomes a ``catalogue_problem`` event, so operators see it in ``dynvm events``."""
    from provisioner.catalogue.store import Catalogue

    previous = rt.catalogue
    rt.catalogue = Catalogue.load_serving(
        rt.config.catalogue_dir, rt.config.storage.artefacts, previous=previous
    )
    report_catalogue_problems(rt, {str(f) for f in previous.problems} if previous is not None else set())


def report_catalogue_problems(rt: Runtime, already: set[str]) -> None:
    from provisioner.errors import DynvmError

    for f in rt.catalogue.problems:
        if str(f) in already:
            continue
        # Redis down: the CLI and `image validate` still show it; a report never fails a boot.
        with contextlib.suppress(DynvmError):
            rt.store.add_event("catalogue_problem", str(f), host=rt.host or "", file=f.file)


def claim_request(rt: Runtime, host: str, inst: Instance) -> ClaimRequest:
    """The claim of ``inst`` on ``host`` with everything the claim script checks at commit: capacity, its
    anti-affinity group and its VO's quota (placement, migration and failover build it the same way)."""
    from provisioner.state.claims import ClaimRequest

    vo_cfg = rt.config.vos.get(inst.vo) if inst.vo is not None else None
    return ClaimRequest(
        host,
        inst.id,
        inst.vcpus,
        inst.memory_mib,
        vo=inst.vo,
        group=inst.anti_affinity,
        max_instances=vo_cfg.max_instances if vo_cfg is not None else None,
        max_vcpus=vo_cfg.max_vcpus if vo_cfg is not None else None,
    )


def try_claim(rt: Runtime, host: str, inst: Instance) -> str:
    """Commit ``inst``'s capacity on ``host`` atomically, with the configured overcommit, its anti-affinity
    group and its VO's quota, on a host whose agent holds its lease; 'ok' or why not (a claim code)."""
    sched = rt.config.scheduler
    req = claim_request(rt, host, inst)
    result = rt.store.claim_batch([req], (), sched.cpu_overcommit, sched.memory_overcommit)
    return result.codes[inst.id]


def claim(rt: Runtime, host: str, inst: Instance) -> bool:
    """try_claim() as a yes/no."""
    return try_claim(rt, host, inst) == "ok"


def build_runtime(config: Config, host: str | None = None) -> Runtime:
    from provisioner.catalogue.store import Catalogue
    from provisioner.state.store import StateStore

    store = StateStore.from_url(config.redis_url)
    store.ping()
    catalogue = Catalogue.load_serving(config.catalogue_dir, config.storage.artefacts)
    rt = Runtime(config=config, store=store, catalogue=catalogue, host=host)
    report_catalogue_problems(rt, set())
    return rt


def serve(rt: Runtime, queue: str, name: str, concurrency: int) -> None:
    """Consume one queue with a thread pool until shut down (no gossip/mingle: nothing here needs them)."""
    import os

    worker = rt.app.Worker(
        queues=[queue],
        pool="threads",
        concurrency=concurrency,
        hostname=f"{name}@{os.uname().nodename}",
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    worker.start()
    code = getattr(worker, "exitcode", None)
    if code not in (None, 0):
        # Celery returns from start() after an unrecoverable error (logged with its traceback) as after a
        # shutdown: a daemon that then exited 0 would not be restarted by a supervisor's on-failure rule.
        from provisioner.errors import UnavailableError

        raise UnavailableError(
            f"{name} stopped with exit code {code} (an unrecoverable error or an interrupt; see its log)"
        )


@contextlib.contextmanager
def boot_slot(rt: Runtime, instance_id: str) -> Iterator[bool]:
    """The agent's per-instance slot that boot_instance takes (``rt.booting``): yields whether it was free;
    while held, no boot, reconciler re-drive or health stop of the instance runs in this agent (the only
    one that may start it on this host)."""
    with rt.lock:
        free = instance_id not in rt.booting
        if free:
            rt.booting.add(instance_id)
    try:
        yield free
    finally:
        if free:
            with rt.lock:
                rt.booting.discard(instance_id)
