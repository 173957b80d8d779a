"""What every CLI handler receives: the parsed options, lazily loaded config and catalogue, the output."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from provisioner.cli.output import Output
from provisioner.errors import UnavailableError

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
        self._embedded = False  # the config is the embedded default (no file, no farm)

    @property
    def config_path_option(self) -> str | None:
        value = getattr(self.args, "config", None)
        return str(value) if value is not None else None

    @property
    def config(self) -> Config:
        if self._config is None:
            from provisioner.config import config_path
            from provisioner.configload import load_config

            path = config_path(self.config_path_option)
            self._config = load_config(path)
            self._embedded = path is None
        return self._config

    @property
    def state_config(self) -> Config:
        """The configuration of a command that needs Redis.

        Refused (UnavailableError, exit 5) when there is neither a configuration file nor a running farm:
        the embedded default's Redis URL would silently reach whatever listens on 127.0.0.1:6379.
        """
        from provisioner.config import farm_dir

        cfg = self.config
        if self._embedded:
            raise UnavailableError(
                f"no dynvm configuration (--config, $DYNVM_CONFIG, /etc/dynvm/dynvm.yaml) and no farm up in "
                f"{farm_dir()}: start one with `dynvm farm up`"
            )
        return cfg

    @property
    def catalogue(self) -> Catalogue:
        if self._catalogue is None:
            from provisioner.catalogue.store import Catalogue

            cfg = self.config
            # One bad file never stops a command: its family keeps its last good version; say so loudly.
            self._catalogue = Catalogue.load_serving(cfg.catalogue_dir, cfg.storage.artefacts)
            for problem in self._catalogue.problems:
                self.out.warning(f"catalogue: {problem}")
        return self._catalogue
