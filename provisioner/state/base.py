"""The Redis seam: connection, error translation and the Lua scripts shared by the store's parts."""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import resources
from typing import Any, ParamSpec, Self, TypeVar, cast

import redis
import redis.exceptions

from provisioner.errors import UnavailableError
from provisioner.redisurl import redact
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
        except redis.exceptions.ReadOnlyError:
            # A write reached a server that was just demoted (a Sentinel failover in progress): retryable.
            url = getattr(args[0], "url", "?")
            raise UnavailableError(f"redis at {redact(url)} is read-only (failover in progress)") from None
        except redis.exceptions.ResponseError as err:
            if not str(err).startswith(("NOREPLICAS", "UNBLOCKED")):
                raise
            # The server refuses writes because it lost its replicas (min-replicas-to-write), or it unblocked
            # our blocking read because it was demoted: after a Sentinel failover it is the old master.  Drop
            # our connections so the next command asks the sentinels for the new master.
            store = args[0]
            client = getattr(store, "r", None)
            if client is not None:
                client.connection_pool.disconnect()
            url = getattr(store, "url", "?")
            why = "refuses writes (no replica: " if str(err).startswith("NOREPLICAS") else "was demoted ("
            raise UnavailableError(f"redis at {redact(url)} {why}failover?)") from None

    return wrapper


def connect(url: str) -> redis.Redis:
    """A client for ``url``: one server, or (``sentinel://``) whichever server the sentinels name master,
    followed through failovers (a connection to a demoted master is dropped and the master asked again)."""
    from provisioner.errors import ValidationError
    from provisioner.redisurl import check_url, parse_sentinel, scheme_of

    check_url(url)
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 5.0,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": 30,
    }
    if scheme_of(url) == "sentinel":
        from redis.sentinel import Sentinel

        t = parse_sentinel(url)
        sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 2.0}
        if t.sentinel_password is not None:
            sentinel_kwargs["password"] = t.sentinel_password
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(t.sentinels),
            sentinel_kwargs=sentinel_kwargs,
            db=t.db,
            username=t.username,
            password=t.password,
            **common,
        )
        client: redis.Redis = sentinel.master_for(t.service, redis_class=redis.Redis)  # type: ignore[no-untyped-call]
        return client
    try:
        return redis.Redis.from_url(url, **common)
    except ValueError as err:
        raise ValidationError(f"redis url {redact(url)!r}: {err}") from None


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
        self.r: redis.Redis = connect(url)
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
