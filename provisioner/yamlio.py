"""YAML files with line numbers, so every problem is reported as ``file:LINE: dotted.path: message``.

A document is parsed with the safe loader (libyaml when present: loading the whole catalogue must take a
few ms), and the node tree is walked once to reject duplicate keys and to record the line of every mapping
key and sequence item.  :func:`validate_model` turns a pydantic ``ValidationError`` into ONE line naming the
file, the line and the dotted path (``hosts[2].uri``).

Errors carry ``dynvm_file`` and ``dynvm_line`` attributes (see :func:`where`); they live in ``__dict__``,
which ``BaseException.__reduce__`` keeps, so the errors stay picklable.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from provisioner.errors import ValidationError

try:  # libyaml is ~10x faster; the pure-Python loader gives the same nodes and marks
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

# Every YAML file dynvm reads (configuration, catalogue) is refused above this size before it is read:
# parsing costs ~100x the file size in memory, and a real file is a few kB.
MAX_FILE_BYTES = 1024 * 1024
# Aliases can make a tiny document expand exponentially ("billion laughs"); cap the walk.  The same bound
# is applied to the parser's events first, which is cheap (streaming) where building the tree is not.
MAX_NODES = 100_000
MAX_REPR = 60
# A key echoed in a dotted path must look like a key, not like a line of some other file
# (`--config /etc/shadow` must not print a password hash).
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$")

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=pydantic.BaseModel)
E = TypeVar("E", bound=ValidationError)


@dataclass
class Document:
    """A parsed YAML mapping and the line (1-based) of every key / item, by path."""

    source: str
    data: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)

    def line(self, loc: Loc) -> int | None:
        """The line of the longest prefix of ``loc`` found in the document."""
        for n in range(len(loc), -1, -1):
            hit = self.lines.get(tuple(loc[:n]))
            if hit is not None:
                return hit
        return None


def short_repr(value: object, limit: int = MAX_REPR) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def safe_key(key: object) -> str:
    """``key`` as text if it looks like a key; otherwise a placeholder that echoes nothing of it."""
    text = str(key)
    return text if _SAFE_KEY.match(text) else "<unrecognised key>"


def dotted(loc: Loc) -> str:
    """``("hosts", 2, "uri")`` -> ``hosts[2].uri``; a key that does not look like one is not echoed."""
    out = ""
    for raw in loc:
        part = raw if isinstance(raw, int) or raw == "[key]" else safe_key(raw)
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        else:
            out += f".{part}" if out else str(part)
    return out


def where(err: BaseException) -> tuple[str | None, int | None]:
    """The file and line an error was raised for, if it came from here."""
    return getattr(err, "dynvm_file", None), getattr(err, "dynvm_line", None)


def located(error_cls: type[E], source: str, line: int | None, message: str) -> E:
    """An error whose message starts with ``file:LINE:`` and which remembers both."""
    prefix = f"{source}:{line}" if line is not None else source
    one_line = " ".join(message.split("\n"))
    err = error_cls(f"{prefix}: {one_line}")
    err.__dict__.update(dynvm_file=source, dynvm_line=line)
    return err


def read_text(path: Path, error_cls: type[E]) -> str:
    """The file's text; unreadable, non-regular, over-large and non-UTF-8 files are errors naming the file.

    A FIFO or device is refused without blocking (opened non-blocking, checked with fstat before any
    read), and the size is checked before reading.
    """
    src = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise located(error_cls, src, None, f"cannot read: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise located(error_cls, src, None, f"not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size > MAX_FILE_BYTES:
        os.close(fd)
        raise located(error_cls, src, None, f"file larger than {MAX_FILE_BYTES} bytes ({st.st_size})")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise located(error_cls, src, None, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:  # it grew while we read it
        raise located(error_cls, src, None, f"file larger than {MAX_FILE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw[exc.start : exc.start + 4]
        raise located(error_cls, src, line, f"not valid UTF-8 at byte offset {exc.start} ({bad!r})") from None


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def _count_events(text: str, source: str, error_cls: type[E]) -> None:
    """Refuse a document of more than MAX_NODES parser events before building its tree (a flat list of
    millions of items costs seconds and hundreds of MB to compose, and a few ms to count)."""
    loader = _Loader(text)
    try:
        n = 0
        while loader.check_event():
            loader.get_event()
            n += 1
            if n > MAX_NODES:
                raise located(error_cls, source, None, f"document has over {MAX_NODES} YAML nodes")
    except yaml.YAMLError:
        return  # parse() reports it, with its line
    finally:
        loader.dispose()


def parse(text: str, source: str, error_cls: type[E]) -> Document:
    """Parse one YAML document that must be a mapping."""
    _count_events(text, source, error_cls)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise located(error_cls, source, None, "empty file (expected a mapping)")
        # Walk the nodes BEFORE constructing: construction flattens merge keys ("<<: *base"), after
        # which a legitimate override would look like a duplicate key.
        lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        _Walker(source, lines, error_cls).walk(node, ())
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        ctx = exc.context
        if ctx and exc.context_mark is not None and exc.context_mark is not mark:
            ctx += f" (started at line {exc.context_mark.line + 1})"
        what = " ".join(p for p in (ctx, exc.problem) if p)
        raise located(error_cls, source, line, f"malformed YAML: {what}") from None
    except yaml.YAMLError as exc:  # e.g. a reader error on a control character
        raise located(error_cls, source, None, f"malformed YAML: {exc}") from None
    except RecursionError:
        raise located(error_cls, source, None, "malformed YAML: nesting too deep") from None
    finally:
        loader.dispose()
    if data is None:  # "---" or "~" alone: nothing to read either
        raise located(error_cls, source, None, "empty file (expected a mapping)")
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "null"
        raise located(error_cls, source, node.start_mark.line + 1, f"top level must be a mapping, got {kind}")
    return Document(source=source, data=data, lines=lines)


def load(path: Path, error_cls: type[E]) -> Document:
    """Read and parse ``path``; every problem is an ``error_cls`` naming the file (and line)."""
    return parse(read_text(path, error_cls), str(path), error_cls)


class _Walker:
    """Records lines and rejects duplicate keys, bounded in the number of nodes visited."""

    def __init__(self, source: str, lines: dict[Loc, int], error_cls: type[ValidationError]) -> None:
        self.source = source
        self.lines = lines
        self.error_cls = error_cls
        self.visited = 0

    def walk(self, node: yaml.Node, loc: Loc) -> None:
        self.visited += 1
        if self.visited > MAX_NODES:
            raise located(self.error_cls, self.source, None, f"document expands to over {MAX_NODES} nodes")
        if len(loc) > 100:
            raise located(self.error_cls, self.source, node.start_mark.line + 1, "nesting too deep")
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines.setdefault((*loc, i), item.start_mark.line + 1)
                self.walk(item, (*loc, i))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, value_node in node.value:
                key = _key_of(key_node)
                line = key_node.start_mark.line + 1
                if key in seen and key_node.tag != "tag:yaml.org,2002:merge":
                    path = dotted((*loc, str(key)))
                    raise located(
                        self.error_cls,
                        self.source,
                        line,
                        f"{path}: duplicate key {short_repr(safe_key(key))} (first at line {seen[key]})",
                    )
                seen[key] = line
                if isinstance(key, str | int):
                    self.lines.setdefault((*loc, key), line)
                    self.walk(value_node, (*loc, key))


def _key_of(node: yaml.Node) -> object:
    if isinstance(node, yaml.ScalarNode):
        # Resolve like the constructor does, so `1:` and `"1":` differ but `a:` and `'a':` collide.
        if node.tag == "tag:yaml.org,2002:int":
            try:
                return int(node.value.replace("_", ""), 0)
            except ValueError:
                return node.value
        if node.tag == "tag:yaml.org,2002:bool":
            return node.value.lower() in ("yes", "true", "on")
        if node.tag == "tag:yaml.org,2002:null":
            return None
        return node.value
    return id(node)  # complex keys are rejected by the constructor already


def pydantic_message(err: Mapping[str, Any]) -> str:
    """One pydantic error as text, with the offending value when it is short enough to help."""
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    kind = str(err.get("type", ""))
    if kind == "extra_forbidden":
        return "unknown key (not allowed here)"
    if kind == "missing":
        return "required key is missing"
    value = err.get("input")
    if kind != "value_error" and not isinstance(value, dict | list):
        msg += f" (got {short_repr(value)})"
    return msg


_LEADING_PATH = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_][\w-]*)*): ")


def _parse_dotted(text: str) -> Loc:
    return tuple(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", text))


def validate_model(doc: Document, model: type[M], error_cls: type[E], **context: Any) -> M:
    """Validate ``doc.data`` against ``model``; the first error becomes ONE located line."""
    try:
        return model.model_validate(doc.data, context=context or None)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        loc: Loc = tuple(first.get("loc", ()))
        message = pydantic_message(first)
        # Model-level validators name the field themselves ("hosts[2].name: duplicate ..."): use it.
        inner = _LEADING_PATH.match(message)
        if inner:
            loc = (*loc, *_parse_dotted(inner.group(1)))
            message = message[inner.end() :]
        path = dotted(loc)
        more = (
            f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
            if len(errors) > 1
            else ""
        )
        text = f"{path}: {message}{more}" if path else f"{message}{more}"
        raise located(error_cls, doc.source, doc.line(loc), text) from None
