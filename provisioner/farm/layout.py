"""Where a farm keeps its files, and the farm.json state file every later command reads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provisioner.errors import ValidationError
from provisioner.farm.qemu.procs import pid_alive

__all__ = ["FarmLayout", "FarmState", "pid_alive"]


@dataclass
class FarmState:
    driver: str
    hosts: list[str]
    redis_url: str
    redis_pid: int | None = None
    supervisor_pid: int | None = None
    children: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    own_redis: bool = True
    restarts: dict[str, int] = field(default_factory=dict)


class FarmLayout:
    def __init__(self, base: Path) -> None:
        self.base = base

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

    def read_state(self) -> FarmState | None:
        try:
            raw: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ValidationError(f"{self.state_file}: unreadable farm state: {err}") from None
        return FarmState(**raw)

    def write_state(self, st: FarmState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(st), indent=1))
        os.replace(tmp, self.state_file)
