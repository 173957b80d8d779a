"""Everything the CLI prints goes through :class:`Output`: rich for people, JSON for scripts.

JSON mode (DESIGN.md, CLI contract): lists are one JSON array of objects, ``show`` one object, streams one
object per line; enums are lowercase strings and times ISO 8601 UTC.  Errors are ONE line on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from provisioner.errors import DynvmError

Mode = Literal["table", "json"]


def iso_utc(t: datetime) -> str:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: enums -> lowercase strings, datetimes -> ISO 8601 UTC, models -> dicts."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Enum):
        return str(value.value).lower()
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):  # a pydantic model (duck-typed: hooks must not import pydantic)
        return to_jsonable(value.model_dump(mode="python"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, Mapping):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((to_jsonable(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return str(value)


def _cell(value: Any) -> str:
    """A value as people read it in a table cell."""
    v = to_jsonable(value)
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ", ".join(_cell(x) for x in v) or "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items()) or "-"
    return str(v)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.extend(_flatten(v, key))
        else:
            out.append((key, v))
    return out


class Output:
    """Where and how the CLI prints; one instance per command run."""

    def __init__(self, mode: Mode = "table") -> None:
        self.mode: Mode = mode

    @property
    def json(self) -> bool:
        return self.mode == "json"

    def _console(self, stderr: bool = False) -> Any:
        from rich.console import Console  # rich costs ~30 ms to import; JSON mode never needs it

        stream = sys.stderr if stderr else sys.stdout
        columns = os.environ.get("COLUMNS", "")
        # Not a terminal (pipes, tests): wide enough that tables do not wrap mid-value.
        width = None if stream.isatty() else (int(columns) if columns.isdigit() else 160)
        return Console(file=stream, width=width, highlight=False, soft_wrap=False)

    def _print_json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(to_jsonable(value), sort_keys=False) + "\n")
        sys.stdout.flush()

    def table(self, rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
        """A list: a rich table of ``columns`` for people, the whole rows as a JSON array for scripts."""
        if self.json:
            self._print_json(rows)
            return
        from rich.table import Table

        t = Table(title=title, box=None, header_style="bold", pad_edge=False)
        for c in columns:
            t.add_column(c.upper().replace("_", " "), overflow="fold")
        for row in rows:
            t.add_row(*(_cell(row.get(c)) for c in columns))
        self._console().print(t)

    def obj(self, d: Mapping[str, Any], title: str | None = None) -> None:
        """One object: a JSON object, or a key/value view (nested keys dotted)."""
        if self.json:
            self._print_json(d)
            return
        from rich.table import Table

        t = Table(title=title, box=None, show_header=False, pad_edge=False)
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        for k, v in _flatten(to_jsonable(d)):
            t.add_row(k, _cell(v))
        self._console().print(t)

    def stream(self, d: Mapping[str, Any]) -> None:
        """One item of a stream (``--follow``/``--watch``): one JSON line, or one ``key=value`` line."""
        if self.json:
            self._print_json(d)
            return
        sys.stdout.write(" ".join(f"{k}={_cell(v)}" for k, v in to_jsonable(d).items()) + "\n")
        sys.stdout.flush()

    def message(self, text: str) -> None:
        """Human feedback ("promoted ..."); on stderr in JSON mode so stdout stays parseable."""
        stream = sys.stderr if self.json else sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def warning(self, text: str) -> None:
        sys.stderr.write(f"dynvm: warning: {_one_line(text)}\n")
        sys.stderr.flush()

    def error(self, err: DynvmError) -> None:
        """ONE line on stderr for a dynvm error."""
        msg = _one_line(err.message)
        if self.json:
            line = json.dumps({"error": {"code": err.code, "message": msg}})
        else:
            line = f"dynvm: error: {msg}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def internal_error(self, exc: BaseException) -> None:
        msg = _one_line(f"{type(exc).__name__}: {exc}")
        if self.json:
            line = json.dumps({"error": {"code": "internal", "message": msg}})
        else:
            line = f"dynvm: internal error: {msg} (set DYNVM_DEBUG=1 for a traceback)"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


# An error line echoes values (ids, paths, arguments); one of 100 kB made a 100 kB line.  Each long word is
# cut in the middle (its start names the culprit, its end keeps a path's file name and ":LINE:"), then the
# whole line, so the message stays readable.
MAX_WORD = 200
MAX_LINE = 1000
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD + 1},}}")


def _cut_word(m: re.Match[str]) -> str:
    word = m.group(0)
    return f"{word[:120]}...({len(word)} chars)...{word[-40:]}"


def _one_line(text: str) -> str:
    line = " ".join(str(text).split("\n")).replace("\r", " ")
    line = _LONG_WORD.sub(_cut_word, line)
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 20] + f"...({len(line)} chars)"
