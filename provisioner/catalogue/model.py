"""The image catalogue schema (pydantic v2, ``extra="forbid"``).

One YAML file per image family.  A family has a name, a kind, and immutable versions; channels map a
channel name to one version.  Artefact paths are relative to the catalogue's artefact root (the shared
storage), never absolute and never containing ``..``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
CHANNEL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
VO_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# ``sha256: local``: an artefact each machine builds for itself (the test images, from the Debian kernel of
# the day): nothing to pin, so nothing to check.  Anything a site distributes keeps a pinned checksum.
LOCAL = "local"
CHECKSUM_RE = re.compile(rf"^(?:[0-9a-f]{{64}}|{LOCAL})$")
# A kernel command line may carry spaces and '=' but no quote, angle bracket or control character.
CMDLINE_RE = re.compile(r"^[A-Za-z0-9 _.,:/=+@-]{0,1024}$")

Name = Annotated[str, Field(pattern=NAME_RE.pattern)]
Version = Annotated[str, Field(pattern=VERSION_RE.pattern)]
VOName = Annotated[str, Field(pattern=VO_RE.pattern)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class ImageKind(StrEnum):
    WORKER = "worker"
    SERVICE = "service"


class Priority(StrEnum):
    """Priority tiers, highest first (DESIGN.md, One scheduler)."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class Artefact(Strict):
    """A file on the shared storage, relative to the artefact root, with its checksum (or ``local``)."""

    path: str
    sha256: Annotated[str, Field(pattern=CHECKSUM_RE.pattern)]

    @property
    def pinned(self) -> bool:
        """False for ``sha256: local`` (built on each machine; ``image validate`` checks no checksum)."""
        return self.sha256 != LOCAL

    @field_validator("path")
    @classmethod
    def _safe_relative(cls, v: str) -> str:
        if not v or v.startswith("/") or "\\" in v or "\x00" in v:
            raise ValueError(f"artefact path {v!r} must be a non-empty relative path")
        parts = v.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"artefact path {v!r} must not contain '..', '.' or empty components")
        if not re.fullmatch(r"[A-Za-z0-9._/+-]+", v):
            raise ValueError(f"artefact path {v!r} has characters outside [A-Za-z0-9._/+-]")
        return v


class DiskSource(Artefact):
    format: DiskFormat = DiskFormat.QCOW2


class DirectBoot(Strict):
    kernel: Artefact
    initrd: Artefact | None = None
    cmdline: str = "console=ttyS0"

    @field_validator("cmdline")
    @classmethod
    def _safe_cmdline(cls, v: str) -> str:
        if not CMDLINE_RE.fullmatch(v):
            raise ValueError("cmdline may only contain [A-Za-z0-9 _.,:/=+@-] (max 1024 characters)")
        return v


class Bounds(Strict):
    default: int = Field(ge=1)
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if not (self.min <= self.default <= self.max):
            raise ValueError(f"need min <= default <= max, got {self.min} <= {self.default} <= {self.max}")
        return self


class ProbeType(StrEnum):
    DOMAIN_STATE = "domain_state"
    SERIAL_MARKER = "serial_marker"
    TCP = "tcp"
    EXEC = "exec"
    GUEST_AGENT = "guest_agent"


class Probe(Strict):
    """One probe vocabulary for readiness and health.

    As a readiness probe: sampled every ``interval_s`` until it passes, for at most ``timeout_s``.  As a
    health probe (``health:`` of a version; the host's agent samples the version's running service VMs):
    one sample every ``interval_s``, each given ``timeout_s`` to answer; ``failures`` failed samples in a
    row make the VM unhealthy (the leader then restarts it in place, or relocates it past the image's
    ``ha.max_restarts``).  ``guest_agent``: the guest answers a no-op through its exec channel in time.
    """

    type: ProbeType
    marker: str | None = Field(default=None, pattern=r"^[A-Za-z0-9 _.:=/-]{1,128}$")
    # serial_marker readiness only: a line the guest prints when it gives up (the boot fails at once)
    fail_marker: str | None = Field(default=None, pattern=r"^[A-Za-z0-9 _.:=/-]{1,128}$")
    port: int | None = Field(default=None, ge=1, le=65535)
    command: list[str] | None = None
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    interval_s: float = Field(default=1.0, gt=0, le=600)
    failures: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _needs(self) -> Probe:
        if self.type is ProbeType.SERIAL_MARKER and not self.marker:
            raise ValueError("a serial_marker probe needs 'marker'")
        if self.fail_marker is not None and self.type is not ProbeType.SERIAL_MARKER:
            raise ValueError("'fail_marker' belongs to a serial_marker probe")
        if self.type is ProbeType.TCP and self.port is None:
            raise ValueError("a tcp probe needs 'port'")
        if self.type is ProbeType.EXEC and not self.command:
            raise ValueError("an exec probe needs 'command'")
        return self


# One health sample may wait this long at most (a hung guest is found after ``failures`` such waits).
HEALTH_MAX_TIMEOUT_S = 300.0


class ExecMethod(StrEnum):
    SERIAL = "serial"  # virtio-serial job channel (the farm's test images)
    SSH = "ssh"  # production images
    NONE = "none"


class ExecSpec(Strict):
    method: ExecMethod = ExecMethod.SERIAL
    user: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    port: int | None = Field(default=None, ge=1, le=65535)


class HAPolicy(Strict):
    priority: Priority = Priority.NORMAL
    detection_class: Literal["fast", "standard", "slow"] = "standard"
    max_restarts: int = Field(default=3, ge=0, le=1000)
    restart_window_s: int = Field(default=3600, ge=1)
    anti_affinity: Annotated[str, Field(pattern=NAME_RE.pattern)] | None = None
    start_after: list[Name] = Field(default_factory=list)


class ImageVersion(Strict):
    version: Version
    disk: DiskSource | None = None
    boot: DirectBoot | None = None
    vcpus: Bounds = Bounds(default=1, min=1, max=1)
    memory_mib: Bounds = Bounds(default=256, min=64, max=256)
    readiness: Probe = Probe(type=ProbeType.DOMAIN_STATE)
    health: Probe | None = None
    exec: ExecSpec = ExecSpec()
    retired: bool = False
    created: str | None = None

    @model_validator(mode="after")
    def _has_source(self) -> ImageVersion:
        if self.disk is None and self.boot is None:
            raise ValueError("a version needs 'disk' or 'boot' (or both)")
        for what, probe in (("readiness", self.readiness), ("health", self.health)):
            if (probe is not None and probe.type in (ProbeType.EXEC, ProbeType.GUEST_AGENT)
                    and self.exec.method is not ExecMethod.SERIAL):
                raise ValueError(f"{what}.type: a {probe.type.value} probe runs through the serial exec "
                                 f"channel; this version's exec.method is {self.exec.method.value}")
        if self.health is not None:
            h = self.health
            if h.type is ProbeType.SERIAL_MARKER:
                raise ValueError("health.type: a serial marker says a guest booted, not that it still "
                                 "answers; use domain_state, tcp, exec or guest_agent")
            if h.timeout_s > HEALTH_MAX_TIMEOUT_S:
                raise ValueError(f"health.timeout_s: at most {HEALTH_MAX_TIMEOUT_S:g} s per sample "
                                 f"(got {h.timeout_s:g})")
        return self

    def artefacts(self) -> list[Artefact]:
        out: list[Artefact] = []
        if self.disk is not None:
            out.append(self.disk)
        if self.boot is not None:
            out.append(self.boot.kernel)
            if self.boot.initrd is not None:
                out.append(self.boot.initrd)
        return out


class ImageFamily(Strict):
    """The contents of one catalogue file."""

    schema_version: Literal[1] = 1
    name: Name
    kind: ImageKind
    description: str = ""
    vos: list[VOName] = Field(default_factory=list)
    ha: HAPolicy | None = None
    versions: list[ImageVersion] = Field(min_length=1)
    channels: dict[Annotated[str, Field(pattern=CHANNEL_RE.pattern)], Version] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ImageFamily:
        # Each message starts with the field it is about: yamlio.validate_model turns that into the line.
        seen: dict[str, int] = {}
        for i, v in enumerate(self.versions):
            if v.version in seen:
                first = seen[v.version]
                raise ValueError(
                    f"versions[{i}].version: duplicate version {v.version!r} (first at versions[{first}])"
                )
            seen[v.version] = i
        for ch, ver in self.channels.items():
            if ver not in seen:
                raise ValueError(f"channels.{ch}: points at missing version {ver!r}")
        if self.kind is ImageKind.WORKER and not self.vos:
            raise ValueError("kind: a worker image must serve at least one VO ('vos')")
        if self.kind is ImageKind.SERVICE and self.vos:
            raise ValueError("vos: a service image serves no VO; remove 'vos'")
        return self

    def version(self, version: str) -> ImageVersion | None:
        return next((v for v in self.versions if v.version == version), None)


class ResolvedImage(Strict):
    """One concrete image version, as the rest of dynvm consumes it."""

    name: Name
    kind: ImageKind
    vos: list[VOName]
    ha: HAPolicy | None
    spec: ImageVersion

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.spec.version}"
