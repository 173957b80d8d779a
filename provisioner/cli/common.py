"""Helpers shared by the CLI groups that talk to the running system."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from provisioner.cli.context import CliContext
from provisioner.runtime import Runtime

if TYPE_CHECKING:
    from provisioner.config import Config
    from provisioner.state.store import StateStore


def runtime(ctx: CliContext) -> Runtime:
    """A client runtime (state store, catalogue, Celery app for sending); built once per command."""
    rt: Runtime | None = getattr(ctx, "_runtime", None)
    if rt is None:
        from provisioner.messaging import make_app
        from provisioner.state.store import StateStore

        store = StateStore.from_url(ctx.state_config.redis_url)
        ping(store, ctx.config)
        rt = Runtime(config=ctx.config, store=store, catalogue=ctx.catalogue)
        rt.app = make_app(ctx.config)
        ctx._runtime = rt  # type: ignore[attr-defined]
    return rt


def ping(store: StateStore, config: Config) -> None:
    """Ask Redis once; a server that refuses the database or does not speak Redis is one clear line.

    A lost connection is UnavailableError already (the store's guard); these are not connection errors
    in redis-py, so they would otherwise end as "internal error".
    """
    import redis.exceptions

    from provisioner.errors import ConfigError, UnavailableError
    from provisioner.redisurl import redact

    url = redact(config.redis_url)
    try:
        store.ping()
    except redis.exceptions.ResponseError as err:  # e.g. "DB index is out of range", "NOAUTH ..."
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"redis_url {url!r} in {config.source}: the server refused it: {detail}") from None
    except (redis.exceptions.InvalidResponse, redis.exceptions.DataError) as err:
        raise UnavailableError(
            f"redis_url {url!r} in {config.source}: the server there does not speak the Redis protocol "
            f"({type(err).__name__})"
        ) from None
    except redis.exceptions.RedisError as err:  # anything else from the client: still one line
        raise UnavailableError(f"redis at {url}: {type(err).__name__}: {err}") from None


def check_redis(config: Config) -> None:
    """A daemon's start-up check: Redis answers at the configured URL (before the daemon acts)."""
    from provisioner.state.store import StateStore

    store = StateStore.from_url(config.redis_url)
    try:
        ping(store, config)
    finally:
        store.close()


def ts(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def instance_row(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    for k in ("created", "updated"):
        d[k] = ts(d.get(k))
    return d
