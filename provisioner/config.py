"""The configuration file: one YAML document, validated once at start-up, passed explicitly.

Lookup order: ``--config PATH``, then ``$DYNVM_CONFIG``, then /etc/dynvm/dynvm.yaml; when none exists the
embedded default (a local farm on libvirt's test driver) is used.  Errors name the file, the dotted path
and the problem in one line: ``dynvm.yaml: hosts[2].uri: ...``.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from provisioner.catalogue.model import NAME_RE, VO_RE

DEFAULT_CONFIG_PATH = Path("/etc/dynvm/dynvm.yaml")
CONFIG_ENV = "DYNVM_CONFIG"
SCHEMA_VERSION = 1

HostName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
LabelKey = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,62}$")]
LabelValue = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{0,63}$")]


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` passed every `gt=0` and broke later (OverflowError in a timer).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DomainType(StrEnum):
    KVM = "kvm"
    QEMU = "qemu"
    TEST = "test"


class DetectionClass(Strict):
    """How fast a host of this class is declared dead (counted from its last lease renewal)."""

    lease_ttl_s: float = Field(default=3.0, gt=0, le=3600)
    dead_after_s: float = Field(default=4.0, gt=0, le=86400)
    samples: int = Field(default=2, ge=1, le=100)


class HostConfig(Strict):
    name: HostName
    uri: str = Field(min_length=1, max_length=512)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    detection_class: Annotated[str, Field(pattern=NAME_RE.pattern)] = "standard"
    fence_command: list[str] | None = None
    # Where this host receives live migrations (libvirt's --migrateuri), e.g. tcp://10.1.2.3:49152.
    migration_uri: str | None = Field(default=None, pattern=r"^tcp://[A-Za-z0-9.:\[\]-]+(:[0-9]{1,5})?$")
    # Where this host's agent receives its peers' UDP heartbeats (self-fencing quorum), e.g. 10.1.0.11:7946.
    peer_address: str | None = Field(default=None, pattern=r"^[0-9.]{7,15}:[0-9]{1,5}$")
    # Storage leases (layer 2): this host's virtlockd pid file; a dead virtlockd fences the host's HA VMs.
    virtlockd_pidfile: Path | None = None

    @model_validator(mode="after")
    def _uri_scheme(self) -> HostConfig:
        scheme = self.uri.split(":", 1)[0]
        if "://" not in self.uri or not scheme.replace("+", "").isalnum():
            raise ValueError(f"uri {self.uri!r} is not a libvirt URI (e.g. qemu:///system)")
        return self


class IdentitySource(StrEnum):
    UNIX_GROUP = "unix_group"  # pool account's primary group (cms001 -> cms)
    SLURM_ACCOUNT = "slurm_account"  # only with slurmdbd enforcement
    CONDOR_PROXY_VO = "condor_proxy_vo"  # x509UserProxyVOName as the schedd recorded it


class VOConfig(Strict):
    """A VO the site supports: which image its jobs get and which trusted identities map to it."""

    image: str = Field(min_length=1, max_length=128)  # "name[:version|:channel]" of a worker image
    groups: list[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")]] = Field(default_factory=list)
    accounts: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]] = Field(default_factory=list)
    max_vcpus: int | None = Field(default=None, ge=0)
    max_instances: int | None = Field(default=None, ge=0)
    # A job of a VO at its limits waits (requeued until the VO is under them) or fails (provisioner.limits).
    over_limit: Literal["wait", "fail"] = "wait"


class IdentityConfig(Strict):
    sources: list[IdentitySource] = Field(default_factory=lambda: [IdentitySource.UNIX_GROUP])


class StorageConfig(Strict):
    shared_dir: Path = Path("/var/lib/dynvm/shared")
    artefact_dir: Path | None = None  # default: <shared_dir>/images
    overlay_dir: Path | None = None  # default: <shared_dir>/instances
    # True only where libvirt cannot tell the storage is shared although every host sees it (the local
    # farm's plain directory): live migration then passes VIR_MIGRATE_UNSAFE.
    unrecognised_shared: bool = False

    @property
    def artefacts(self) -> Path:
        return self.artefact_dir or self.shared_dir / "images"

    @property
    def overlays(self) -> Path:
        return self.overlay_dir or self.shared_dir / "instances"


class NetworkConfig(Strict):
    """Where service VMs' NICs go: a bridge on the site network (the farm's bridge locally)."""

    bridge: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
    prefix_len: int = Field(default=24, ge=1, le=32)
    # Network namespace from which agents reach guests for TCP probes (the local QEMU farm's LAN lives in
    # its own namespace); None = the agent's own namespace, as in production.
    probe_netns: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SchedulerConfig(Strict):
    weigher: Literal["least_loaded", "pack"] = "least_loaded"
    cpu_overcommit: float = Field(default=1.0, gt=0, le=16)
    memory_overcommit: float = Field(default=1.0, gt=0, le=4)


class TimeoutsConfig(Strict):
    libvirt_call_s: float = Field(default=10.0, gt=0, le=3600)
    provision_s: float = Field(default=300.0, gt=0, le=86400)
    visibility_s: float = Field(default=3600.0, gt=0, le=7 * 86400)
    reconcile_interval_s: float = Field(default=10.0, gt=0, le=3600)


class OutboxConfig(Strict):
    """The control workers' sweeper (provisioner.control.sweeper): requests and placements whose message
    was lost are sent again, moved or failed with a reason; nothing stays requested or placed forever."""

    sweep_interval_s: float = Field(default=2.0, gt=0, le=600)
    resend_after_s: float = Field(default=5.0, gt=0, le=3600)  # requested, not picked up: send again
    pickup_deadline_s: float = Field(default=60.0, gt=0, le=86400)  # no control worker took it: fail
    boot_after_s: float = Field(default=30.0, gt=0, le=86400)  # placed, agent alive, not booting: BOOT again
    replace_after_s: float = Field(default=15.0, gt=0, le=86400)  # placed on a host with no lease: re-place
    max_placements: int = Field(default=3, ge=1, le=100)  # re-placements before it fails


class RetentionConfig(Strict):
    """Ended instances (gone, failed, lost) leave the hot indexes at once and expire after ``ended_s``;
    a compact history of each end (capped at ``history_max`` entries) is kept for accounting."""

    ended_s: float = Field(default=86400.0, ge=0, le=366 * 86400)
    history_max: int = Field(default=100_000, ge=1, le=10_000_000)


class PoolsConfig(Strict):
    """Warm pools and the demand watcher (batch_hooks.pools/demand).  Per-VO min/max/idle timeout live in
    Redis (``dynvm pool set``); these are the values of a VO nobody has set yet."""

    min: int = Field(default=0, ge=0, le=10_000)
    max: int = Field(default=0, ge=0, le=10_000)
    idle_timeout_s: float = Field(default=600.0, ge=0, le=7 * 86400)
    watch_interval_s: float = Field(default=10.0, gt=0, le=3600)
    batch: Literal["none", "slurm", "htcondor"] = "none"  # where pending jobs are counted
    cluster: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    reclaim_grace_s: float = Field(default=300.0, ge=0, le=86400)
    # The watcher as a daemon: every control worker runs one when batch is not none, and a Redis lease
    # (batch_hooks.watcher.WatcherLease) lets exactly one of them run cycles; another takes over within
    # watcher_lease_s of the holder's death.  False: only `dynvm pool watch` runs it.
    watcher: bool = True
    watcher_lease_s: float = Field(default=15.0, ge=0.5, le=3600)
    read_timeout_s: float = Field(default=30.0, gt=0, le=3600)  # hard deadline of one squeue / schedd read


class BreakerConfig(Strict):
    """Circuit breaker per image (provisioner.breaker)."""

    failures: int = Field(default=3, ge=1, le=1000)
    backoff_s: float = Field(default=300.0, gt=0, le=86400)
    max_backoff_s: float = Field(default=3600.0, gt=0, le=7 * 86400)


class HAConfig(Strict):
    """The monitors (``dynvm monitor``) and the failover engine (ha/); agents read ``watchdog_s`` too."""

    round_s: float = Field(default=0.1, ge=0.01, le=60)  # how often the leader looks (detection resolution)
    leader_lease_s: float = Field(default=1.0, ge=0.05, le=3600)  # a standby takes over within this
    storm_share: float = Field(default=0.4, gt=0, le=1)  # more dead at once: hold (a half is a storm)
    safety_margin_s: float = Field(default=0.5, ge=0, le=3600)  # past the self-fence deadline
    watchdog_s: float = Field(default=2.0, gt=0, le=3600)  # the per-host watchdog's timeout
    # Agents (provisioner.agent.fencing): the watchdog process they start, self-fencing and peer heartbeats.
    watchdog: bool = True  # the agent starts `dynvm watchdog --host NAME` when none runs for its host
    fence_margin_s: float = Field(default=0.5, ge=0, le=3600)  # self-fence this long before the lease ends
    # Test-only switch (tests/ha_qemu/test_fencing_layers.py: each fencing layer alone): false turns the
    # agents' quorum rule off, so an isolated host keeps its HA guests.  Never false in production.
    self_fence: bool = True
    # Test-only switch (the storage-lease layer alone, same test): true makes each service's data disk raw
    # with QEMU's share-rw=on, so QEMU's own image lock no longer refuses a second start and only the
    # virtlockd lease can.  Production keeps it false: QEMU's image lock stays as a further layer.
    share_rw_data_disks: bool = False
    peer_interval_s: float = Field(default=0.2, gt=0, le=60)  # UDP heartbeat to every peer this often
    peer_timeout_s: float = Field(default=1.0, gt=0, le=3600)  # a peer not heard for this long is lost
    peer_secret_file: Path | None = None  # shared secret: heartbeats carry an HMAC-SHA256
    # Per-host local state (agent record for a restart's lease handover, watchdog pet/lock files).
    # Default: <storage.shared_dir>/run/agents (files are named by host).
    run_dir: Path | None = None


class Config(Strict):
    schema_version: Literal[1] = 1
    # redis://[user:pw@]host:port/db or sentinel://[user:pw@]h1:p1,h2:p2,.../service[/db] (see redisurl.py)
    redis_url: str = "redis://127.0.0.1:6379/0"
    catalogue_dir: Path = Path("images")
    domain_type: DomainType = DomainType.KVM
    # How libvirt reads a started guest's CPU back: "x86" (two QMP reads; each domain carries
    # <qemu:capabilities><qemu:del capability='cpu-unavailable-features'/>, which libvirt logs as a taint) or
    # "generic" (libvirt 9.x's default with QEMU >= 4.1: ~415 QMP reads, ~0.25 s more QEMU CPU per start).
    # Same guest either way (provisioner/hypervisor/domxml.py X86_CPU_READBACK_CAPABILITY).
    guest_cpu_readback: Literal["x86", "generic"] = "x86"
    storage: StorageConfig = StorageConfig()
    hosts: list[HostConfig] = Field(default_factory=list)
    identity: IdentityConfig = IdentityConfig()
    vos: dict[Annotated[str, Field(pattern=VO_RE.pattern)], VOConfig] = Field(default_factory=dict)
    detection_classes: dict[str, DetectionClass] = Field(
        default_factory=lambda: {
            "fast": DetectionClass(lease_ttl_s=2.0, dead_after_s=2.5, samples=2),
            "standard": DetectionClass(),
            "slow": DetectionClass(lease_ttl_s=10.0, dead_after_s=30.0, samples=3),
        }
    )
    scheduler: SchedulerConfig = SchedulerConfig()
    network: NetworkConfig = NetworkConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    outbox: OutboxConfig = OutboxConfig()
    retention: RetentionConfig = RetentionConfig()
    pools: PoolsConfig = PoolsConfig()
    breaker: BreakerConfig = BreakerConfig()
    ha: HAConfig = HAConfig()
    source: str = Field(default="<embedded default>", exclude=True)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        from provisioner.errors import DynvmError
        from provisioner.redisurl import check_url, redact

        try:
            check_url(url)
        except DynvmError as err:
            raise ValueError(str(err).replace(f"redis url {redact(url)!r}: ", "")) from None
        return url

    @model_validator(mode="after")
    def _unique_hosts(self) -> Config:
        seen: set[str] = set()
        for i, h in enumerate(self.hosts):
            if h.name in seen:
                raise ValueError(f"hosts[{i}].name: duplicate host name {h.name!r}")
            seen.add(h.name)
            if h.detection_class not in self.detection_classes:
                raise ValueError(f"hosts[{i}].detection_class: unknown class {h.detection_class!r}")
        return self

    def host(self, name: str) -> HostConfig | None:
        return next((h for h in self.hosts if h.name == name), None)


def config_path(explicit: str | None) -> Path | None:
    """The file to read, or None for the embedded default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    running_farm = farm_dir() / "dynvm.yaml"  # written by `dynvm farm up`, gone with `farm down`
    return running_farm if (farm_dir() / "farm.json").exists() else None


def farm_dir() -> Path:
    """Where ``dynvm farm up`` keeps its state (config, pids, Redis, shared storage)."""
    env = os.environ.get("DYNVM_FARM_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/dynvm/farm")
    return Path.home() / ".local" / "state" / "dynvm" / "farm"


def checkout_images_dir() -> Path:
    """The default catalogue (images/): the checkout's, or the copy an installed wheel ships."""
    from provisioner.catalogue.shipped import images_dir

    return images_dir()
