"""Where a farm keeps its files, and the farm.json state file every later command reads.

A pid in farm.json is trusted only together with the identity recorded when the process was started
(boot id + start time, see :func:`provisioner.farm.qemu.procs.identity`): after a reboot or pid reuse the
same number names somebody else's process, which must never be signalled or taken for the farm.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provisioner.errors import UsageError, ValidationError
from provisioner.farm.qemu.procs import identity, is_ours, pid_alive

__all__ = ["FarmLayout", "FarmState", "pid_alive"]


@dataclass
class FarmState:
    """Written by ``farm up`` before the supervisor starts, then by the supervisor alone."""

    driver: str
    hosts: list[str]
    redis_url: str
    redis_pid: int | None = None
    supervisor_pid: int | None = None
    children: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    own_redis: bool = True
    restarts: dict[str, int] = field(default_factory=dict)
    # process name ("supervisor", "redis", child name) -> identity() taken when it was started
    idents: dict[str, str] = field(default_factory=dict)
    keep_state: bool = False
    # hosts of an earlier layout found in the kept state -> what the supervisor did with them
    retired: dict[str, str] = field(default_factory=dict)
    last_error: str = ""
    last_error_at: float = 0.0
    monitors: int = 2  # `dynvm monitor` processes (one leads, the others stand by)

    def record(self, name: str, pid: int) -> None:
        """Remember who ``pid`` is (call while it is our unreaped child, so it cannot be reused)."""
        ident = identity(pid)
        if ident is not None:
            self.idents[name] = ident

    def ours(self, name: str, pid: int | None) -> bool:
        """``pid`` is alive and is the very process started as ``name`` by this farm."""
        return is_ours(pid, self.idents.get(name))

    def supervisor_up(self) -> bool:
        return self.ours("supervisor", self.supervisor_pid)


class FarmLayout:
    def __init__(self, base: Path) -> None:
        if str(base) == "":
            raise UsageError("farm directory: empty path")
        # Absolute: the supervisor, its children and the config file must all mean the same directory.
        self.base = Path(os.path.abspath(os.path.expanduser(base)))

    @property
    def state_file(self) -> Path:
        return self.base / "farm.json"

    @property
    def config_file(self) -> Path:
        return self.base / "dynvm.yaml"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def shared(self) -> Path:
        return self.base / "shared"

    @property
    def catalogue(self) -> Path:
        return self.shared / "catalogue"

    @property
    def redis_dir(self) -> Path:
        return self.base / "redis"

    @property
    def hosts_dir(self) -> Path:
        return self.base / "hosts"

    @property
    def down_dir(self) -> Path:
        """One file per host killed by ``dynvm farm kill``: the supervisor keeps that host's processes
        down while it exists (its truth; ``farm revive`` removes it)."""
        return self.base / "down"

    def host_down(self, host: str) -> bool:
        return (self.down_dir / host).exists()

    def read_state(self) -> FarmState | None:
        try:
            raw: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ValidationError(f"{self.state_file}: unreadable farm state: {err}") from None
        if not isinstance(raw, dict):
            raise ValidationError(f"{self.state_file}: unreadable farm state: not an object")
        known = {f.name for f in dataclasses.fields(FarmState)}
        try:
            return FarmState(**{k: v for k, v in raw.items() if k in known})
        except TypeError as err:
            raise ValidationError(f"{self.state_file}: unreadable farm state: {err}") from None

    def write_state(self, st: FarmState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(st), indent=1))
        os.replace(tmp, self.state_file)
