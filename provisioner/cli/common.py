"""Helpers shared by the CLI groups that talk to the running system."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from provisioner.cli.context import CliContext
from provisioner.runtime import Runtime


def runtime(ctx: CliContext) -> Runtime:
    """A client runtime (state store, catalogue, Celery app for sending); built once per command."""
    rt: Runtime | None = getattr(ctx, "_runtime", None)
    if rt is None:
        from provisioner.messaging import make_app
        from provisioner.state.store import StateStore

        store = StateStore.from_url(ctx.state_config.redis_url)
        store.ping()
        rt = Runtime(config=ctx.config, store=store, catalogue=ctx.catalogue)
        rt.app = make_app(ctx.config)
        ctx._runtime = rt  # type: ignore[attr-defined]
    return rt


def ts(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def instance_row(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    for k in ("created", "updated"):
        d[k] = ts(d.get(k))
    return d
