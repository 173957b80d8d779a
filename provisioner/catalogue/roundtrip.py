"""Round-trip YAML for catalogue edits: an edit changes the lines it must and keeps the operator's comments,
key order, quoting and flow style everywhere else (ruamel.yaml's round-trip mode).

Only text that :mod:`provisioner.yamlio` has already read (size-bounded, duplicate keys and alias bombs
refused) is handed to ruamel; what an edit writes is parsed back with yamlio and checked against the schema
before it replaces anything (see edit.py), so the two parsers can never disagree silently.
"""

from __future__ import annotations

import io
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from provisioner.errors import CatalogueError

Tree = CommentedMap


class Editor:
    """One document's tree plus the indentation it was written with (kept when it is dumped)."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.yaml = YAML(typ="rt", pure=True)
        self.yaml.preserve_quotes = True
        self.yaml.width = 4096  # never re-wrap an operator's long line
        try:
            _, seq_indent, offset = load_yaml_guess_indent(text)
            self.tree = self.yaml.load(text)
        except YAMLError as exc:  # yamlio read it already: only a parser difference gets here
            raise CatalogueError(f"{source}: cannot edit: {str(exc).splitlines()[0]}") from None
        if not isinstance(self.tree, CommentedMap):
            raise CatalogueError(f"{source}: cannot edit: top level is not a mapping")
        seq_indent = seq_indent or 4
        offset = 2 if offset is None else offset
        mapping = max(2, seq_indent - offset) if offset else seq_indent
        self.yaml.indent(mapping=mapping, sequence=seq_indent, offset=offset)
        self.offset = offset  # where a sequence item's dash (and a comment above it) starts

    def dump(self) -> str:
        out = io.StringIO()
        self.yaml.dump(self.tree, out)
        return out.getvalue()


def quoted(value: str) -> DoubleQuotedScalarString:
    """A string written in double quotes: versions ("1.0"), checksums (all digits) and timestamps must
    never be read back as a number or a date."""
    out: DoubleQuotedScalarString = DoubleQuotedScalarString(value)
    return out


def mapping(node: Any, key: str) -> CommentedMap:
    """``node[key]`` as a mapping, created (appended) when absent."""
    child = node.get(key)
    if not isinstance(child, CommentedMap):
        child = CommentedMap()
        node[key] = child
    return child


def sequence(node: Any, key: str) -> CommentedSeq:
    child = node.get(key)
    if not isinstance(child, CommentedSeq):
        child = CommentedSeq()
        node[key] = child
    return child


def leading_comment(seq: CommentedSeq) -> str | None:
    """The comment lines written above a sequence's first item (without '#'), if any."""
    tokens = (seq.ca.comment or [None, None])[1] or []
    lines = [line.strip().removeprefix("#").strip() for t in tokens for line in str(t.value).splitlines()]
    lines = [line for line in lines if line]
    return "\n".join(lines) or None


def append_item(seq: CommentedSeq, item: Any, comment: str | None, indent: int) -> None:
    seq.append(item)
    if comment:
        seq.yaml_set_comment_before_after_key(len(seq) - 1, before=comment, indent=indent)
