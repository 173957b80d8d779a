"""What every CLI handler receives: the parsed options, lazily loaded config and catalogue, the output."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from provisioner.cli.output import Output

if TYPE_CHECKING:
    from provisioner.catalogue.store import Catalogue
    from provisioner.config import Config


class CliContext:
    """Loaded on first use, so ``dynvm --help`` or a hook never pays for what it does not need."""

    def __init__(self, args: argparse.Namespace, out: Output) -> None:
        self.args = args
        self.out = out
        self._config: Config | None = None
        self._catalogue: Catalogue | None = None

    @property
    def config_path_option(self) -> str | None:
        value = getattr(self.args, "config", None)
        return str(value) if value is not None else None

    @property
    def config(self) -> Config:
        if self._config is None:
            from provisioner.config import config_path
            from provisioner.configload import load_config

            self._config = load_config(config_path(self.config_path_option))
        return self._config

    @property
    def catalogue(self) -> Catalogue:
        if self._catalogue is None:
            from provisioner.catalogue.store import Catalogue

            cfg = self.config
            self._catalogue = Catalogue.load(cfg.catalogue_dir, cfg.storage.artefacts)
        return self._catalogue
