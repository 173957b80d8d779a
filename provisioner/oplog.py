"""Operation log: one line per operation (provision, place, boot, ready, release, migrate, reconcile fix,
lease problem) in the agent's and worker's log, as text or JSON.

Every event added to the event stream is also logged here (``StateStore.add_event`` calls :func:`event`),
so the log and ``dynvm events`` never disagree and no caller needs a second line to be observable.  A line
names the operation, the instance, the host, the VO and the duration when known, and for a failure its
cause.  Failures are WARNING/ERROR, everything else INFO.

Neutral module: imported by the state store, so it imports nothing of dynvm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Literal

LOGGER = "dynvm.ops"
LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")

# Kinds that mean something went wrong (ERROR) or needed fixing / may need a look (WARNING).
ERROR_KINDS = frozenset(
    {"failed", "migration_failed", "migration_orphaned", "lease_lost", "host_unreachable"}
)
WARNING_KINDS = frozenset({"retry", "orphan_destroyed", "claim_released", "redrive", "preempted", "lost"})
MAX_FIELD = 500  # a log line stays a line

log = logging.getLogger(LOGGER)
# A CLI process configures no logging: without a handler here Python's last-resort handler would print
# warnings to stderr and break the CLI's "one line on stderr" contract.  Daemons add a root handler.
log.addHandler(logging.NullHandler())

_FIELDS = ("op", "instance", "host", "vo", "duration_ms")


def _clip(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 3] + "..."


def since(record: object) -> float | None:
    """Seconds since a record (an instance) was created: how long the operation took from the request."""
    created = getattr(record, "created", None)
    return max(0.0, time.time() - created) if isinstance(created, int | float) and created > 0 else None


def level_of(kind: str) -> int:
    if kind in ERROR_KINDS or kind.endswith("_failed"):
        return logging.ERROR
    if kind in WARNING_KINDS:
        return logging.WARNING
    return logging.INFO


def context_fields(
    instance: str | None, host: str | None, vo: str | None, duration_s: float | None
) -> dict[str, str | int]:
    """The fields an operation's log line and its event share (only those that are set)."""
    out: dict[str, str | int] = {}
    if instance:
        out["instance"] = instance
    if host:
        out["host"] = host
    if vo:
        out["vo"] = vo
    if duration_s is not None:
        out["duration_ms"] = round(duration_s * 1000)
    return out


def event(
    kind: str,
    message: str = "",
    *,
    instance: str | None = None,
    host: str | None = None,
    vo: str | None = None,
    duration_s: float | None = None,
    extra: Mapping[str, object] | None = None,
) -> None:
    """Log one operation as one line.  Never raises (an observability aid must not break the operation)."""
    try:
        fields: dict[str, object] = {"op": kind, **context_fields(instance, host, vo, duration_s)}
        for k, v in (extra or {}).items():
            if k not in fields and v not in (None, ""):
                fields[k] = _clip(v)
        log.log(level_of(kind), _clip(message), extra={"dynvm": fields})
    except Exception:  # logging must never fail an operation; the line is lost, but not silently
        with contextlib.suppress(Exception):
            log.exception("operation log: cannot log a %s event", _clip(kind))


class TextFormatter(logging.Formatter):
    """``2026-11-30T22:41:03.123Z INFO op=ready instance=ab12 host=hv1 vo=cms duration_ms=812 message``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, object] = getattr(record, "dynvm", {})
        parts = [_iso(record.created), record.levelname]
        if fields:
            parts.extend(f"{k}={_clip(v)}" for k, v in fields.items())
        else:
            parts.append(f"logger={record.name}")
        msg = record.getMessage()
        if msg:
            parts.append(_clip(msg) if fields else msg)
        line = " ".join(parts)
        if record.exc_info:
            line += " cause=" + _clip(self.formatException(record.exc_info).splitlines()[-1])
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and the operation's fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj.update(getattr(record, "dynvm", {}))
        if record.exc_info:
            obj["cause"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(obj, default=str)


def _iso(t: float) -> str:
    ms = int((t % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"


def setup(fmt: LogFormat = "text", level: int = logging.INFO) -> None:
    """Log to stderr for a long-running process (agent, worker): INFO and up, Celery's chatter at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # Celery sets the root logger's level to its own (WARNING) when the worker starts: our loggers keep
    # theirs, so operation lines still reach the handler above.
    for ours in (LOGGER, "provisioner", "ha", "batch_hooks"):
        logging.getLogger(ours).setLevel(level)
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
