"""Artefacts on the shared storage: safe path resolution and cached sha256 checksums.

Hashing a multi-GB disk image takes seconds, so checksums are cached by (real path, device, inode, size,
mtime_ns) in a small JSON file (per user, under $XDG_CACHE_HOME); any change to the file invalidates its
entry.  The cache is an optimisation only: a lost or corrupt cache file is silently rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from provisioner.errors import CatalogueError

_CHUNK = 1 << 20


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynvm" / "sha256-cache.json"


def artefact_path(root: Path, relative: str) -> Path:
    """``root/relative`` with symlinks resolved; CatalogueError if it escapes ``root``.

    The schema already refuses absolute paths and '..'; this also catches symlinks pointing outside.
    """
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / relative))
    if real != real_root and real_root not in real.parents:
        raise CatalogueError(
            f"artefact {relative!r} resolves to {str(real)!r}, outside the artefact root {str(real_root)!r}"
        )
    return real


class ChecksumCache:
    """sha256 of files, remembered across runs while the file's identity and mtime are unchanged."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: dict[str, str] | None = None
        self._dirty = False
        self.hashed_bytes = 0  # how much was actually read (for benchmarks and tests)

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None:
                with contextlib.suppress(OSError, ValueError):
                    raw = json.loads(self.path.read_text("utf-8"))
                    if isinstance(raw, dict):
                        self._entries = {str(k): str(v) for k, v in raw.items()}
        return self._entries

    def sha256(self, path: Path) -> str:
        """The file's sha256 (hex); OSError if it cannot be read."""
        st = path.stat()
        # One entry per path (a changed file replaces its entry, so the cache does not grow).
        signature = f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|"
        entries = self._load()
        hit = entries.get(str(path), "")
        if hit.startswith(signature):
            return hit[len(signature) :]
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                self.hashed_bytes += len(chunk)
        digest = h.hexdigest()
        entries[str(path)] = signature + digest
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the cache atomically; failures are ignored (the cache is only an optimisation)."""
        if self.path is None or not self._dirty or self._entries is None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".sha256-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self._entries, f)
                os.replace(tmp, self.path)
                self._dirty = False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
