"""The last good text of each catalogue file, so one bad file never stops the rest of the catalogue, nor
its own family.

Why on disk and not only in memory: the CLI and the batch hooks are short-lived processes, and an agent or
worker that restarts while a file is bad must still serve that family.  Kept per user under
``$XDG_CACHE_HOME/dynvm/last-good/<catalogue>/NAME.yaml`` (one directory per catalogue, by its real path).
A cached copy is parsed and validated exactly like the file itself before it is used, so a damaged or
foreign cache only means "no last good version known".  Writing it is best effort (a read-only home only
loses the fallback).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from provisioner.catalogue.checksums import default_cache_path
from provisioner.catalogue.files import Entry, parse_family
from provisioner.catalogue.model import NAME_RE
from provisioner.errors import CatalogueError


class LastGood:
    def __init__(self, root: Path | None) -> None:
        self.root = root  # None: remember nothing (tests, tools)

    @classmethod
    def default(cls) -> LastGood:
        return cls(default_cache_path().parent / "last-good")

    def _dir(self, directory: Path) -> Path | None:
        if self.root is None:
            return None
        key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
        return self.root / key

    def remember(self, directory: Path, entry: Entry) -> None:
        """Keep ``entry``'s text as the last good version of its family (only when it changed)."""
        d = self._dir(directory)
        if d is None or not entry.text:
            return
        target = d / f"{entry.family.name}.yaml"
        with contextlib.suppress(OSError):
            if target.is_file() and target.read_text("utf-8") == entry.text:
                return
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".lg-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(f"# last good copy of {directory / target.name}\n" + entry.text)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def recall(self, directory: Path, name: str) -> Entry | None:
        """The last good version of family ``name`` of ``directory``, if one is known and still valid."""
        d = self._dir(directory)
        if d is None or not NAME_RE.fullmatch(name):
            return None
        path = d / f"{name}.yaml"
        if not path.is_file():
            return None
        try:
            entry = parse_family(path)
        except CatalogueError:
            return None
        return entry if entry.family.name == name else None
