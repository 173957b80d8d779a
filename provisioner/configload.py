"""Load and check the configuration file (schema in :mod:`provisioner.config`).

The result is passed explicitly to whoever needs it; nothing here keeps global state.
"""

from __future__ import annotations

from pathlib import Path

from provisioner import yamlio
from provisioner.config import (
    Config,
    DomainType,
    StorageConfig,
    VOConfig,
    checkout_images_dir,
    farm_dir,
)
from provisioner.errors import ConfigError

DEFAULT_VOS = {"cms": "cms-wn", "atlas": "atlas-wn", "lhcb": "lhcb-wn"}


def default_config() -> Config:
    """The embedded default: a local farm on libvirt's test driver, the checkout's catalogue."""
    return Config(
        domain_type=DomainType.TEST,
        catalogue_dir=checkout_images_dir(),
        storage=StorageConfig(shared_dir=farm_dir() / "shared"),
        vos={vo: VOConfig(image=image, groups=[vo]) for vo, image in DEFAULT_VOS.items()},
    )


def load_config(path: Path | None) -> Config:
    """The validated configuration in ``path`` (None: the embedded default).

    Raises ConfigError with one line ``dynvm.yaml:12: hosts[2].uri: ...``.
    """
    if path is None:
        return default_config()
    doc = yamlio.load(path, ConfigError)
    if "source" in doc.data:  # a real field of Config, but set by us, not by the file
        raise yamlio.located(
            ConfigError, doc.source, doc.line(("source",)), "source: unknown key (not allowed here)"
        )
    config = yamlio.validate_model(doc, Config, ConfigError)
    _check_mappings(config, doc)
    return _resolve_paths(config, path.parent, str(path))


def _check_mappings(config: Config, doc: yamlio.Document) -> None:
    """A Unix group or Slurm account must map to one VO only: otherwise a job's VO is ambiguous."""
    owners: dict[tuple[str, str], str] = {}
    for vo, vc in config.vos.items():
        for kind, names in (("groups", vc.groups), ("accounts", vc.accounts)):
            for i, name in enumerate(names):
                other = owners.setdefault((kind, name), vo)
                if other != vo:
                    raise yamlio.located(
                        ConfigError,
                        doc.source,
                        doc.line(("vos", vo, kind, i)),
                        f"vos.{vo}.{kind}[{i}]: {name!r} is already mapped to VO {other!r}",
                    )


def _resolve_paths(config: Config, base: Path, source: str) -> Config:
    """Relative paths in the file mean "next to the file", whatever the current directory is."""

    def rel(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    st = config.storage
    storage = st.model_copy(
        update={
            "shared_dir": rel(st.shared_dir),
            "artefact_dir": rel(st.artefact_dir),
            "overlay_dir": rel(st.overlay_dir),
        }
    )
    return config.model_copy(
        update={"catalogue_dir": rel(config.catalogue_dir), "storage": storage, "source": source}
    )
