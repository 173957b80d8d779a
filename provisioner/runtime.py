"""What a control worker or host agent needs at hand, built once at start-up and passed explicitly."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from provisioner.config import Config

if TYPE_CHECKING:
    from provisioner.catalogue.model import ResolvedImage
    from provisioner.catalogue.store import Catalogue
    from provisioner.interfaces import Hypervisor
    from provisioner.model import Instance
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
    catalogue_mtime: int | None = None  # catalogue directory mtime at the last load
    lock: threading.Lock = field(default_factory=threading.Lock)


def resolve_image(rt: Runtime, ref: str) -> ResolvedImage:
    """Resolve through a catalogue that follows edits: the directory's mtime changes with every atomic
    rename, so a long-running agent or worker reloads when an operator adds or promotes an image."""
    from provisioner.catalogue.store import Catalogue
    from provisioner.errors import UnknownImageError

    directory = rt.config.catalogue_dir
    try:
        mtime = directory.stat().st_mtime_ns
    except OSError:
        mtime = 0
    if rt.catalogue_mtime != mtime:
        rt.catalogue = Catalogue.load(directory, rt.config.storage.artefacts)
        rt.catalogue_mtime = mtime
    try:
        return rt.catalogue.resolve(ref)
    except UnknownImageError:
        # Same-granularity mtime (an edit within the clock tick of our last load): reload once and retry.
        rt.catalogue = Catalogue.load(directory, rt.config.storage.artefacts)
        return rt.catalogue.resolve(ref)


def try_claim(rt: Runtime, host: str, inst: Instance) -> str:
    """Commit ``inst``'s capacity on ``host`` atomically, with the configured overcommit, its anti-affinity
    group and its VO's quota, on a host whose agent holds its lease; 'ok' or why not (a claim code)."""
    from provisioner.state.claims import ClaimRequest

    sched = rt.config.scheduler
    vo_cfg = rt.config.vos.get(inst.vo) if inst.vo is not None else None
    req = ClaimRequest(
        host,
        inst.id,
        inst.vcpus,
        inst.memory_mib,
        vo=inst.vo,
        group=inst.anti_affinity,
        max_instances=vo_cfg.max_instances if vo_cfg is not None else None,
        max_vcpus=vo_cfg.max_vcpus if vo_cfg is not None else None,
    )
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
    catalogue = Catalogue.load(config.catalogue_dir, config.storage.artefacts)
    return Runtime(config=config, store=store, catalogue=catalogue, host=host)


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
