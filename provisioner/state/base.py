"""The Redis seam: connection, error translation and the Lua scripts shared by the store's parts."""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import resources
from typing import Any, ParamSpec, Self, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.exceptions

from provisioner.errors import UnavailableError
from provisioner.state.keys import Keys

P = ParamSpec("P")
R = TypeVar("R")

SCRIPTS = (
    "claim",
    "create_instance",
    "update_instance",
    "delete_instance",
    "register_host",
    "renew_lease",
    "set_host_state",
    "drop_lease",
    "acquire_lease",
    "release_claim",
)
# Blocking reads (events, notifications) are cut into pieces shorter than the socket timeout.
SOCKET_TIMEOUT_S = 30.0
MAX_BLOCK_S = 20.0


def redact(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Translate a lost Redis connection into UnavailableError naming the (redacted) URL."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            store = args[0]
            url = getattr(store, "url", "?")
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UnavailableError(f"redis at {redact(url)} is unreachable: {detail}") from None

    return wrapper


def _script_source(name: str) -> str:
    pkg = resources.files("provisioner.state")
    lib = (pkg / "lib.lua").read_text()
    return lib + "\n" + (pkg / f"{name}.lua").read_text()


class StoreBase:
    """Holds the client; every part of the store (hosts, instances, claims, events) builds on it."""

    def __init__(self, url: str, prefix: str = "dynvm", *, events_maxlen: int = 10_000) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.events_maxlen = events_maxlen
        try:
            self.r: redis.Redis = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=5.0,
                socket_timeout=SOCKET_TIMEOUT_S,
                health_check_interval=30,
            )
        except ValueError as err:
            from provisioner.errors import ValidationError

            raise ValidationError(f"redis url {redact(url)!r}: {err}") from None
        self._scripts: dict[str, Any] = {n: self.r.register_script(_script_source(n)) for n in SCRIPTS}

    @classmethod
    def from_url(cls, url: str, prefix: str = "dynvm") -> Self:
        return cls(url, prefix)

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys, args=[self.keys.prefix, *args])

    @guarded
    def ping(self) -> None:
        """Raise UnavailableError unless Redis answers."""
        self.r.ping()

    def close(self) -> None:
        self.r.close()


def as_str_dict(raw: object) -> dict[str, str]:
    return cast(dict[str, str], raw)


def pairs_to_dict(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[0::2], flat[1::2], strict=True))
