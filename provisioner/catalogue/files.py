"""One catalogue file: parse and validate a family, parse image references (no cross-file checks).

Shared by the catalogue (store.py) and its edits (edit.py), so neither imports the other for these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from provisioner import yamlio
from provisioner.catalogue.model import ImageFamily
from provisioner.errors import CatalogueError, ValidationError

REF_RE = re.compile(r"^([a-z][a-z0-9-]{0,62})(?::([0-9A-Za-z][0-9A-Za-z._+-]{0,63}))?$")
DEFAULT_CHANNEL = "stable"


@dataclass(frozen=True, slots=True)
class Entry:
    """A loaded family with where it came from."""

    family: ImageFamily
    file: Path
    doc: yamlio.Document
    text: str = ""  # the file's text as parsed (kept as the family's last good version)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name``, ``name:version`` or ``name:channel`` -> (name, selector or None)."""
    m = REF_RE.fullmatch(ref) if isinstance(ref, str) else None
    if m is None:
        raise ValidationError(f"image reference {yamlio.short_repr(ref)} is not NAME[:VERSION|:CHANNEL]")
    return m.group(1), m.group(2)


def parse_family(path: Path) -> Entry:
    """Parse and validate one catalogue file (no cross-file checks)."""
    return parse_family_text(yamlio.read_text(path, CatalogueError), path)


def parse_family_text(text: str, path: Path) -> Entry:
    """Like :func:`parse_family`, for text already read (an edit parses exactly what it will change)."""
    doc = yamlio.parse(text, str(path), CatalogueError)
    precheck(doc)
    family = yamlio.validate_model(doc, ImageFamily, CatalogueError)
    return Entry(family, path, doc, text)


def precheck(doc: yamlio.Document) -> None:
    """Cross-field checks the schema also makes, done first here to point at the exact line."""
    versions = doc.data.get("versions")
    seen: dict[object, int] = {}
    if isinstance(versions, list):
        for i, v in enumerate(versions):
            ver = v.get("version") if isinstance(v, dict) else None
            if not isinstance(ver, str):
                continue
            if ver in seen:
                raise yamlio.located(
                    CatalogueError,
                    doc.source,
                    doc.line(("versions", i, "version")),
                    f"versions[{i}].version: duplicate version {ver!r} (first at versions[{seen[ver]}])",
                )
            seen[ver] = i
    channels = doc.data.get("channels")
    if isinstance(channels, dict) and seen:
        for ch, target in channels.items():
            if isinstance(target, str) and target not in seen:
                raise yamlio.located(
                    CatalogueError,
                    doc.source,
                    doc.line(("channels", ch)),
                    f"channels.{ch}: points at missing version {target!r}",
                )


@dataclass(frozen=True, slots=True)
class AddResult:
    name: str
    file: str
    created: bool  # a new family file
    added: list[str]
    unchanged: list[str]
    channels: dict[str, str]
