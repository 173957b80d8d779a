"""What a control worker or host agent needs at hand, built once at start-up and passed explicitly."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from provisioner.config import Config

if TYPE_CHECKING:
    from provisioner.catalogue.store import Catalogue
    from provisioner.interfaces import Hypervisor
    from provisioner.state.store import StateStore


@dataclass
class Runtime:
    config: Config
    store: StateStore
    catalogue: Catalogue
    app: Any = None  # the Celery app (typed Any: celery ships no type hints)
    host: str | None = None  # set in a host agent
    hypervisor: Hypervisor | None = None  # set in a host agent
    extra: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def build_runtime(config: Config, host: str | None = None) -> Runtime:
    from provisioner.catalogue.store import Catalogue
    from provisioner.state.store import StateStore

    store = StateStore.from_url(config.redis_url)
    store.ping()
    catalogue = Catalogue.load(config.catalogue_dir, config.storage.artefacts)
    return Runtime(config=config, store=store, catalogue=catalogue, host=host)
