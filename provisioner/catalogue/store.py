"""The image catalogue: a directory of YAML files, one per image family (the truth; DESIGN.md).

Loading parses and validates every ``*.yaml`` file; lookups never touch the disk again.  Edits
(:meth:`Catalogue.add`, :meth:`promote`, :meth:`retire`) re-read the file they change under a lock and
replace it atomically (see :mod:`provisioner.catalogue.edit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from provisioner import yamlio
from provisioner.catalogue.checksums import ChecksumCache, artefact_path, default_cache_path
from provisioner.catalogue.files import DEFAULT_CHANNEL, AddResult, Entry, parse_family, parse_ref
from provisioner.catalogue.lastgood import LastGood
from provisioner.catalogue.model import Artefact, ImageFamily, ImageKind, ResolvedImage
from provisioner.errors import CatalogueError, DynvmError, UnknownImageError


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found by :meth:`Catalogue.validate`."""

    severity: Severity
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        at = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{at}: {self.severity}: {self.message}"

    @classmethod
    def from_error(cls, err: DynvmError, fallback_file: str) -> Finding:
        file, line = yamlio.where(err)
        msg = err.message
        prefix = f"{file}:{line}: " if line is not None else f"{file}: "
        return cls(Severity.ERROR, file or fallback_file, line, msg.removeprefix(prefix))


def scan(directory: Path) -> tuple[dict[str, Entry], list[CatalogueError]]:
    """Every good family of ``directory`` and every problem found, in file-name order."""
    if not directory.is_dir():
        raise CatalogueError(f"{directory}: catalogue directory does not exist or is not a directory")
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise CatalogueError(f"{directory}: catalogue directory has no *.yaml files (empty catalogue)")
    by_name: dict[str, list[Entry]] = {}
    problems: list[CatalogueError] = []
    for path in files:
        try:
            entry = parse_family(path)
        except CatalogueError as err:
            problems.append(err)
            continue
        by_name.setdefault(entry.family.name, []).append(entry)
    entries: dict[str, Entry] = {}
    for name, found in by_name.items():
        first = found[0]
        line = first.doc.line(("name",))
        if len(found) > 1:
            others = ", ".join(str(e.file) for e in found[1:])
            problems.append(
                yamlio.located(
                    CatalogueError,
                    str(first.file),
                    line,
                    f"name: family {name!r} is also defined in {others}",
                )
            )
        elif first.file.stem != name:
            problems.append(
                yamlio.located(
                    CatalogueError,
                    str(first.file),
                    line,
                    f"name: family {name!r} must live in a file named {name}.yaml",
                )
            )
        else:
            entries[name] = first
    return entries, problems


class Catalogue:
    """The loaded catalogue; cheap to query, edits go through the lock-and-rename path."""

    def __init__(
        self,
        directory: Path,
        artefact_root: Path,
        entries: dict[str, Entry],
        checksums: ChecksumCache | None = None,
    ) -> None:
        self.directory = directory
        self.artefact_root = artefact_root
        self._entries = entries
        self.checksums = checksums if checksums is not None else ChecksumCache(default_cache_path())
        # Bad files found by load_serving (what is served instead is in each message); empty = all good.
        self.problems: list[Finding] = []

    @classmethod
    def load(cls, directory: Path, artefact_root: Path, checksums: ChecksumCache | None = None) -> Catalogue:
        """Load every family; the first problem raises CatalogueError (file:line: path: message)."""
        entries, problems = scan(directory)
        if problems:
            first = problems[0]
            if len(problems) > 1:
                f = Finding.from_error(first, str(directory))
                more = f"{f.message} (and {len(problems) - 1} more problem(s) in {directory})"
                first = yamlio.located(CatalogueError, f.file, f.line, more)
            raise first
        return cls(directory, artefact_root, entries, checksums)

    @classmethod
    def load_serving(
        cls,
        directory: Path,
        artefact_root: Path,
        previous: Catalogue | None = None,
        checksums: ChecksumCache | None = None,
        last_good: LastGood | None = None,
    ) -> Catalogue:
        """What a running system serves: every good file, and for a bad file its family's last good
        version (the on-disk copy, else ``previous``'s), so one bad file never stops the other families
        nor, once seen good, its own.  Each bad file is an error in ``problems``.  Only a missing or
        empty directory raises (there is nothing to serve)."""
        entries, problems = scan(directory)
        lg = last_good if last_good is not None else LastGood.default()
        for entry in entries.values():
            lg.remember(directory, entry)
        kept: dict[str, Entry] = {}
        for stem in sorted({p.stem for p in directory.glob("*.yaml")} - set(entries)):
            old = previous._entries.get(stem) if previous and previous.directory == directory else None
            fallback = lg.recall(directory, stem) or old
            if fallback is not None:
                kept[stem] = fallback
        cat = cls(directory, artefact_root, {**entries, **kept}, checksums)
        for err in problems:
            f = Finding.from_error(err, str(directory))
            stem = Path(f.file).stem
            note = (
                f"serving the last good version of {stem!r} until the file is fixed"
                if stem in kept
                else f"{Path(f.file).name} is not served (no good version of it seen yet)"
            )
            cat.problems.append(Finding(Severity.ERROR, f.file, f.line, f"{f.message}; {note}"))
        return cat

    @classmethod
    def check(
        cls, path: Path, artefact_root: Path, checksums: ChecksumCache | None = None
    ) -> tuple[Catalogue, list[Finding]]:
        """Every finding for a catalogue directory (or a single family file, e.g. before ``add``):
        file problems become error findings instead of stopping at the first one."""
        if path.is_file():
            try:
                entry = parse_family(path)
            except CatalogueError as err:
                return cls(path.parent, artefact_root, {}, checksums), [Finding.from_error(err, str(path))]
            cat = cls(path.parent, artefact_root, {entry.family.name: entry}, checksums)
            return cat, cat.validate()
        entries, problems = scan(path)
        cat = cls(path, artefact_root, entries, checksums)
        findings = [Finding.from_error(p, str(path)) for p in problems]
        for stem in sorted({p.stem for p in path.glob("*.yaml")} - set(entries)):
            if LastGood.default().recall(path, stem) is not None:
                msg = f"while this file is bad, dynvm serves the last good version of {stem!r} it saw"
                findings.append(Finding(Severity.WARNING, str(path / f"{stem}.yaml"), None, msg))
        return cat, findings + cat.validate()

    # -- queries -------------------------------------------------------------------------------------
    def families(self) -> list[ImageFamily]:
        return [self._entries[n].family for n in sorted(self._entries)]

    def entry(self, name: str) -> Entry:
        e = self._entries.get(name)
        if e is None:
            bad = next((p for p in self.problems if Path(p.file).name == f"{name}.yaml"), None)
            if bad is not None:  # name the culprit, not just "unknown"
                at = f"{bad.file}:{bad.line}" if bad.line is not None else bad.file
                raise UnknownImageError(f"image {name!r} is not served: {at} is invalid (see image validate)")
            raise UnknownImageError(f"unknown image {yamlio.short_repr(name)} (catalogue {self.directory})")
        return e

    def family(self, name: str) -> ImageFamily:
        return self.entry(name).family

    def resolve(self, ref: str, *, allow_retired: bool = False) -> ResolvedImage:
        """One concrete version.  A bare name means the ``stable`` channel; an exact version wins over
        a channel of the same name.  Retired versions resolve only by exact version with
        ``allow_retired`` (for ``image show``), never through a channel."""
        name, selector = parse_ref(ref)
        fam = self.family(name)
        sel = selector or DEFAULT_CHANNEL
        ver = fam.version(sel) if selector is not None else None
        if ver is None:
            target = fam.channels.get(sel)
            if target is None:
                what = "version or channel" if selector is not None else "channel"
                known = ", ".join(sorted(fam.channels)) or "none"
                raise UnknownImageError(f"image {name!r} has no {what} {sel!r} (channels: {known})")
            ver = fam.version(target)
            if ver is None or ver.retired:
                raise UnknownImageError(f"channel {name}:{sel} points at retired version {target!r}")
        elif ver.retired and not allow_retired:
            raise UnknownImageError(f"image {name}:{ver.version} is retired")
        return ResolvedImage(name=fam.name, kind=fam.kind, vos=fam.vos, ha=fam.ha, spec=ver)

    def channels_of(self, name: str, version: str) -> list[str]:
        return sorted(ch for ch, v in self.family(name).channels.items() if v == version)

    def worker_images_for_vo(self, vo: str) -> list[ImageFamily]:
        """Worker families that serve ``vo`` (the only images a job of that VO may ever get)."""
        return [f for f in self.families() if f.kind is ImageKind.WORKER and vo in f.vos]

    # -- validation ----------------------------------------------------------------------------------
    def validate(self) -> list[Finding]:
        """Cross-file and artefact checks: missing artefact = warning, wrong pinned checksum = error."""
        findings: list[Finding] = []
        for name in sorted(self._entries):
            findings.extend(self._validate_family(self._entries[name]))
        self.checksums.save()
        return findings

    def _validate_family(self, entry: Entry) -> list[Finding]:
        fam, src, doc = entry.family, str(entry.file), entry.doc
        out: list[Finding] = []
        for ch, target in sorted(fam.channels.items()):
            ver = fam.version(target)
            if ver is not None and ver.retired:
                out.append(
                    Finding(
                        Severity.ERROR,
                        src,
                        doc.line(("channels", ch)),
                        f"channels.{ch}: points at retired version {target!r}",
                    )
                )
            if fam.version(ch) is not None:
                out.append(
                    Finding(
                        Severity.WARNING,
                        src,
                        doc.line(("channels", ch)),
                        f"channels.{ch}: a version has the same name; the version wins",
                    )
                )
        if fam.ha is not None:
            for i, dep in enumerate(fam.ha.start_after):
                if dep not in self._entries:
                    out.append(
                        Finding(
                            Severity.WARNING,
                            src,
                            doc.line(("ha", "start_after", i)),
                            f"ha.start_after[{i}]: unknown image {dep!r}",
                        )
                    )
        for i in range(len(fam.versions)):
            for loc, art in artefacts_with_loc(ver_index=i, fam=fam):
                out.extend(self._check_artefact(src, doc, loc, art))
        return out

    def _check_artefact(
        self, src: str, doc: yamlio.Document, loc: yamlio.Loc, art: Artefact
    ) -> list[Finding]:
        where_ = yamlio.dotted(loc)
        line = doc.line((*loc, "path"))
        try:
            real = artefact_path(self.artefact_root, art.path)
        except CatalogueError as err:
            return [Finding(Severity.ERROR, src, line, f"{where_}.path: {err.message}")]
        if not real.exists():
            return [Finding(Severity.WARNING, src, line, f"{where_}.path: missing artefact {str(real)!r}")]
        if not real.is_file():
            return [Finding(Severity.ERROR, src, line, f"{where_}.path: {str(real)!r} is not a regular file")]
        if not art.pinned:  # built on this machine: whatever it built is right
            return []
        try:
            digest = self.checksums.sha256(real)
        except OSError as exc:
            return [
                Finding(
                    Severity.ERROR, src, line, f"{where_}.path: cannot read {str(real)!r}: {exc.strerror}"
                )
            ]
        if digest != art.sha256:
            return [
                Finding(
                    Severity.ERROR,
                    src,
                    doc.line((*loc, "sha256")),
                    f"{where_}.sha256: checksum mismatch for {art.path!r}: file has {digest}",
                )
            ]
        return []

    # -- edits (atomic, locked; see edit.py) ----------------------------------------------------------
    def add(self, file: Path) -> AddResult:
        """Add a family or new versions of one; a version is immutable (ConflictError if it differs)."""
        from provisioner.catalogue import edit

        result = edit.add(self, file)
        self._reload(result.name)
        return result

    def promote(self, name: str, version: str, channel: str) -> ImageFamily:
        """Point ``channel`` of ``name`` at ``version`` (not a retired one)."""
        from provisioner.catalogue import edit

        edit.promote(self, name, version, channel)
        return self._reload(name)

    def retire(self, name: str, version: str) -> ImageFamily:
        """Mark a version retired; refused while a channel points at it."""
        from provisioner.catalogue import edit

        edit.retire(self, name, version)
        return self._reload(name)

    def _reload(self, name: str) -> ImageFamily:
        entry = parse_family(self.directory / f"{name}.yaml")
        self._entries[name] = entry
        return entry.family


def artefacts_with_loc(ver_index: int, fam: ImageFamily) -> list[tuple[yamlio.Loc, Artefact]]:
    """Each artefact of one version with its path in the document (for line numbers)."""
    ver = fam.versions[ver_index]
    base: yamlio.Loc = ("versions", ver_index)
    out: list[tuple[yamlio.Loc, Artefact]] = []
    if ver.disk is not None:
        out.append(((*base, "disk"), ver.disk))
    if ver.boot is not None:
        out.append(((*base, "boot", "kernel"), ver.boot.kernel))
        if ver.boot.initrd is not None:
            out.append(((*base, "boot", "initrd"), ver.boot.initrd))
    return out
