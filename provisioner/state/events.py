"""The event stream (``dynvm:events``): append-only, capped at about ``events_maxlen`` entries."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from provisioner import oplog
from provisioner.state.base import MAX_BLOCK_S, StoreBase, guarded

_CORE = ("ts", "kind", "instance", "host", "message")
MAX_MESSAGE = 2000  # events are for humans; a runaway message must not bloat the stream


@dataclass(frozen=True, slots=True)
class Event:
    id: str  # the stream id ("1700000000000-0"); pass it as since_id to read on
    ts: str  # ISO 8601 UTC
    kind: str
    instance: str | None = None
    host: str | None = None
    message: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "kind": self.kind,
            "instance": self.instance,
            "host": self.host,
            "message": self.message,
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event written by a state-changing script in the same atomic step as the change it reports
    (``transition(..., event=...)``, ``create_instance(..., event=...)``): no round trip of its own, never
    recorded for a change that was refused, never lost between the change and the append.  ``notify``
    also wakes the instance's waiters in that step.  Its instance is the record's."""

    kind: str
    message: str = ""
    host: str | None = None
    vo: str | None = None
    duration_s: float | None = None
    notify: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def event_fields(
    kind: str,
    message: str,
    instance: str | None,
    host: str | None,
    vo: str | None,
    duration_s: float | None,
    extra: dict[str, Any],
) -> dict[str, str]:
    """The stream entry of an event, as add_event and the scripts write it."""
    fields: dict[str, str] = {"ts": _now_iso(), "kind": kind, "message": message[:MAX_MESSAGE]}
    fields.update({k: str(v) for k, v in oplog.context_fields(instance, host, vo, duration_s).items()})
    fields.update({k: str(v)[:MAX_MESSAGE] for k, v in extra.items() if k not in _CORE})
    return fields


def script_event_args(ev: NewEvent | None, instance: str) -> tuple[int, list[str]]:
    """(number of field pairs, flat pairs) of ``ev`` for a script (lib.lua emit_event); (0, []) for none."""
    if ev is None:
        return 0, []
    f = event_fields(ev.kind, ev.message, instance, ev.host, ev.vo, ev.duration_s, ev.extra)
    return len(f), [x for kv in f.items() for x in kv]


def log_event(ev: NewEvent | None, instance: str) -> None:
    """The event's log line (:mod:`provisioner.oplog`), once the script has written it."""
    if ev is not None:
        oplog.event(
            ev.kind,
            ev.message,
            instance=instance,
            host=ev.host,
            vo=ev.vo,
            duration_s=ev.duration_s,
            extra=ev.extra,
        )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(entry_id: str, f: dict[str, str]) -> Event:
    return Event(
        id=entry_id,
        ts=f.get("ts", ""),
        kind=f.get("kind", ""),
        instance=f.get("instance") or None,
        host=f.get("host") or None,
        message=f.get("message", ""),
        extra={k: v for k, v in f.items() if k not in _CORE},
    )


class EventsMixin(StoreBase):
    @guarded
    def add_event(
        self,
        kind: str,
        message: str = "",
        *,
        instance: str | None = None,
        host: str | None = None,
        vo: str | None = None,
        duration_s: float | None = None,
        notify: bool = False,
        **extra: str,
    ) -> str:
        """Append one event; returns its stream id.  It is also logged as one line (:mod:`provisioner.oplog`),
        first, so the operation is in the process's log even when Redis cannot take the event.
        ``notify``: then wake the instance's waiters (notify()), in the same round trip: a waiter that
        wakes finds the event already there."""
        oplog.event(kind, message, instance=instance, host=host, vo=vo, duration_s=duration_s, extra=extra)
        fields = event_fields(kind, message, instance, host, vo, duration_s, extra)
        pipe = self.r.pipeline(transaction=False)
        pipe.xadd(self.keys.events, cast(Any, fields), maxlen=self.events_maxlen, approximate=True)
        if notify and instance:
            self._notify_into(pipe, instance)
        return str(pipe.execute()[0])

    @guarded
    def read_events(self, count: int = 100, since_id: str | None = None) -> list[Event]:
        """Up to ``count`` events after ``since_id`` (oldest first); without it the latest ``count``."""
        if since_id is None:
            raw = cast(list[Any], self.r.xrevrange(self.keys.events, count=count))
            raw.reverse()
        else:
            raw = cast(list[Any], self.r.xrange(self.keys.events, min=f"({since_id}", count=count))
        return [_event(eid, f) for eid, f in raw]

    @guarded
    def last_event_id(self) -> str:
        """The newest event's id ("0-0" if the stream is empty): where a follower starts."""
        raw = cast(list[Any], self.r.xrevrange(self.keys.events, count=1))
        return str(raw[0][0]) if raw else "0-0"

    @guarded
    def wait_events(self, since_id: str, block_ms: int = 1000, count: int = 100) -> list[Event]:
        """Events after ``since_id``, waiting up to ``block_ms`` for the first one."""
        block = max(0, min(block_ms, int(MAX_BLOCK_S * 1000)))
        raw = cast(list[Any], self.r.xread({self.keys.events: since_id}, count=count, block=block or None))
        out: list[Event] = []
        for _stream, entries in raw or []:
            out.extend(_event(eid, f) for eid, f in entries)
        return out

    def follow_events(
        self,
        since_id: str | None = None,
        block_ms: int = 1000,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[Event]:
        """Yield events as they come (from after ``since_id``, default: from now) until ``stop()``."""
        last = since_id if since_id is not None else self.last_event_id()
        while stop is None or not stop():
            for ev in self.wait_events(last, block_ms=block_ms):
                last = ev.id
                yield ev

    @guarded
    def notify(self, instance_id: str) -> None:
        """Wake whoever waits on this instance (clients with --wait); they re-read its record."""
        pipe = self.r.pipeline(transaction=False)
        self._notify_into(pipe, instance_id)
        pipe.execute()

    def _notify_into(self, pipe: Any, instance_id: str) -> None:
        key = self.keys.notify(instance_id)
        pipe.lpush(key, "1")
        pipe.ltrim(key, 0, 0)
        pipe.pexpire(key, 60_000)

    @guarded
    def wait_notified(self, instance_id: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a notify(); True if one came.  Callers re-check state anyway."""
        key = self.keys.notify(instance_id)
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # BLPOP's timeout is in seconds (fractions allowed since Redis 6).
            got = self.r.blpop([key], timeout=max(min(left, MAX_BLOCK_S), 0.01))
            if got is not None:
                return True
