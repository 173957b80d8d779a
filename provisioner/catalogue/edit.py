"""Catalogue edits: locked read-modify-write with an atomic rename.

Why this shape: the catalogue directory is shared by several control machines and operators.  Each edit
takes an exclusive ``flock`` on a lock file in the directory, re-reads the file it changes from disk (not
the possibly stale in-memory copy, so two concurrent edits never lose each other's change), changes only
what it must in the file's round-trip tree (comments, key order and quoting stay: the catalogue is an
operator's file, often kept in git; see roundtrip.py), checks the result by parsing it back and comparing
it with the family the edit means to produce, writes a temp file in the same directory, fsyncs it and
``os.replace``s it over the old one.  A failing edit leaves the catalogue byte-identical and no temp file
behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from provisioner import yamlio
from provisioner.catalogue import roundtrip
from provisioner.catalogue.checksums import artefact_path
from provisioner.catalogue.files import AddResult, parse_family_text, parse_ref, precheck
from provisioner.catalogue.model import CHANNEL_RE, VERSION_RE, ImageFamily, ImageVersion
from provisioner.errors import CatalogueError, ConflictError, UnknownImageError, ValidationError

if TYPE_CHECKING:
    from provisioner.catalogue.store import Catalogue

LOCK_NAME = ".dynvm-catalogue.lock"
HEADER = "# dynvm image catalogue entry (one family per file; versions are immutable).\n"
# Fields that may differ when the same version is added again (bookkeeping, not content).
_MUTABLE_VERSION_FIELDS = {"retired", "created"}


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on the catalogue directory (held across read-modify-write)."""
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CatalogueError(f"{directory}: cannot lock the catalogue: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file in the same directory, fsync, rename, fsync dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def dump(family: ImageFamily) -> str:
    """A family as a fresh YAML text (no comments to keep: for tools that generate catalogue files)."""
    data = family.model_dump(mode="json", exclude_defaults=True)
    ordered = {"schema_version": family.schema_version, "name": family.name, "kind": family.kind.value}
    ordered.update(data)
    return HEADER + yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _write(path: Path, editor: roundtrip.Editor, intended: ImageFamily) -> None:
    """Write the edited tree, but only if it reads back (with the catalogue's own parser) as ``intended``."""
    text = editor.dump()
    back = parse_family_text(text, path).family
    if back != intended:
        a, b = back.model_dump(mode="json"), intended.model_dump(mode="json")
        raise CatalogueError(
            f"{path}: internal error: the edited file does not read back as intended "
            f"({_first_difference(a, b)}); nothing was written"
        )
    write_atomic(path, text)


def _read(cat: Catalogue, name: str) -> tuple[Path, ImageFamily, roundtrip.Editor]:
    parse_ref(name)
    path = cat.directory / f"{name}.yaml"
    if not path.exists():
        raise UnknownImageError(f"unknown image {name!r} (no {path})")
    text = yamlio.read_text(path, CatalogueError)
    return path, parse_family_text(text, path).family, roundtrip.Editor(text, str(path))


def _fill_checksums(cat: Catalogue, doc: yamlio.Document, data: Any) -> None:
    """Compute the sha256 of every artefact of ``data`` (``doc.data`` or the round-trip tree of the same
    text) given with a path but no checksum (before validation); ``doc`` gives the lines for errors."""
    versions = data.get("versions")
    if not isinstance(versions, list):
        return
    for i, ver in enumerate(versions):
        if not isinstance(ver, dict):
            continue
        boot = ver.get("boot")
        slots: list[tuple[str, ...]] = [("disk",), ("boot", "kernel"), ("boot", "initrd")]
        for slot in slots:
            holder: Any = boot if slot[0] == "boot" else ver
            art = holder.get(slot[-1]) if isinstance(holder, dict) else None
            if not isinstance(art, dict) or "sha256" in art or not isinstance(art.get("path"), str):
                continue
            loc: yamlio.Loc = ("versions", i, *slot)
            where = yamlio.dotted(loc)
            line = doc.line((*loc, "path"))
            try:
                real = artefact_path(cat.artefact_root, art["path"])
                art["sha256"] = roundtrip.quoted(cat.checksums.sha256(real))
            except CatalogueError as err:
                raise yamlio.located(
                    CatalogueError, doc.source, line, f"{where}.path: {err.message}"
                ) from None
            except OSError as exc:
                raise yamlio.located(
                    CatalogueError,
                    doc.source,
                    line,
                    f"{where}: no sha256 given and artefact {art['path']!r} cannot be read under "
                    f"{str(cat.artefact_root)!r} ({exc.strerror})",
                ) from None


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return path or "content"


def _merge(
    current: ImageFamily, new: ImageFamily, src: str, cur_src: str
) -> tuple[ImageFamily, list[str], list[str]]:
    name = current.name
    for field in ("kind", "vos", "ha"):
        if getattr(current, field) != getattr(new, field):
            raise ConflictError(
                f"{src}: {field} of image {name!r} differs from the catalogue ({cur_src}); "
                "family-level fields are changed by editing the catalogue file"
            )
    added: list[str] = []
    unchanged: list[str] = []
    versions = list(current.versions)
    for ver in new.versions:
        old = current.version(ver.version)
        if old is None:
            versions.append(_stamped(ver))
            added.append(ver.version)
            continue
        a = old.model_dump(mode="json", exclude=_MUTABLE_VERSION_FIELDS)
        b = ver.model_dump(mode="json", exclude=_MUTABLE_VERSION_FIELDS)
        if a != b:
            raise ConflictError(
                f"{src}: version {name}:{ver.version} already exists in {cur_src} with a different "
                f"{_first_difference(a, b)} (versions are immutable: publish a new version)"
            )
        unchanged.append(ver.version)
    channels = dict(current.channels)
    for ch, target in new.channels.items():
        if ch in channels and channels[ch] != target:
            raise ConflictError(
                f"{src}: channel {name}:{ch} already points at {channels[ch]!r}, not {target!r} "
                "(move it with 'dynvm image promote')"
            )
        tv = next(v for v in versions if v.version == target)
        if tv.retired:
            raise ConflictError(f"{src}: channel {name}:{ch} cannot point at retired version {target!r}")
        channels[ch] = target
    merged = ImageFamily.model_validate(
        {**current.model_dump(), "versions": [v.model_dump() for v in versions], "channels": channels}
    )
    return merged, added, unchanged


def _stamped(ver: ImageVersion) -> ImageVersion:
    if ver.created is not None:
        return ver
    now = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return ver.model_copy(update={"created": now})


def add(cat: Catalogue, file: Path) -> AddResult:
    text = yamlio.read_text(file, CatalogueError)
    doc = yamlio.parse(text, str(file), CatalogueError)
    precheck(doc)
    _fill_checksums(cat, doc, doc.data)
    new = yamlio.validate_model(doc, ImageFamily, CatalogueError)
    source = roundtrip.Editor(text, str(file))  # the operator's text, comments and all
    _fill_checksums(cat, doc, source.tree)  # the same sums (cached), into what is written
    cat.checksums.save()
    with locked(cat.directory):
        target = cat.directory / f"{new.name}.yaml"
        if not target.exists():
            family = new.model_copy(update={"versions": [_stamped(v) for v in new.versions]})
            for item in roundtrip.sequence(source.tree, "versions"):
                _stamp_item(item, family)
            _write(target, source, family)
            return AddResult(
                new.name, str(target), True, [v.version for v in new.versions], [], dict(new.channels)
            )
        _, current, editor = _read(cat, new.name)
        merged, added, unchanged = _merge(current, new, str(file), str(target))
        if merged != current:
            _append_versions(editor, source, added, merged)
            channels = roundtrip.mapping(editor.tree, "channels") if new.channels else None
            for ch, version in new.channels.items():
                if channels is not None and ch not in current.channels:
                    channels[ch] = roundtrip.quoted(version)
            _write(target, editor, merged)
        return AddResult(new.name, str(target), False, added, unchanged, dict(merged.channels))


def _stamp_item(item: Any, family: ImageFamily) -> None:
    """Give a version's tree the ``created`` stamp the merged family has for it."""
    ver = family.version(str(item.get("version")))
    if ver is not None and ver.created is not None and "created" not in item:
        item["created"] = roundtrip.quoted(ver.created)


def _append_versions(
    editor: roundtrip.Editor, source: roundtrip.Editor, added: list[str], merged: ImageFamily
) -> None:
    """Move the added versions' trees (with their comments) from the input file to the catalogue file."""
    src_seq = roundtrip.sequence(source.tree, "versions")
    dest_seq = roundtrip.sequence(editor.tree, "versions")
    for i, item in enumerate(src_seq):
        if str(item.get("version")) not in added:
            continue
        _stamp_item(item, merged)
        comment = roundtrip.leading_comment(src_seq) if i == 0 else None
        roundtrip.append_item(dest_seq, item, comment, editor.offset)


def _check_token(value: str, field: str, pattern: Any) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValidationError(f"{field}: invalid value {yamlio.short_repr(value)}")


def _version_of(fam: ImageFamily, version: str, path: Path) -> ImageVersion:
    ver = fam.version(version)
    if ver is None:
        raise UnknownImageError(f"image {fam.name!r} has no version {version!r} ({path})")
    return ver


def promote(cat: Catalogue, name: str, version: str, channel: str) -> None:
    _check_token(version, "version", VERSION_RE)
    _check_token(channel, "channel", CHANNEL_RE)
    with locked(cat.directory):
        path, fam, editor = _read(cat, name)
        ver = _version_of(fam, version, path)
        if ver.retired:
            raise ConflictError(f"cannot promote {name}:{version} to {channel!r}: the version is retired")
        if fam.channels.get(channel) == version:
            return
        roundtrip.mapping(editor.tree, "channels")[channel] = roundtrip.quoted(version)
        _write(path, editor, fam.model_copy(update={"channels": {**fam.channels, channel: version}}))


def retire(cat: Catalogue, name: str, version: str) -> None:
    _check_token(version, "version", VERSION_RE)
    with locked(cat.directory):
        path, fam, editor = _read(cat, name)
        ver = _version_of(fam, version, path)
        held = sorted(ch for ch, v in fam.channels.items() if v == version)
        if held:
            raise ConflictError(
                f"cannot retire {name}:{version}: still in channel(s) {', '.join(held)}; "
                "promote another version to it first"
            )
        if ver.retired:
            return
        versions = [
            v.model_copy(update={"retired": True}) if v.version == version else v for v in fam.versions
        ]
        for item in roundtrip.sequence(editor.tree, "versions"):
            if str(item.get("version")) == version:
                item["retired"] = True
        _write(path, editor, fam.model_copy(update={"versions": versions}))
