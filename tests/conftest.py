"""Session-wide fixtures: one private Redis server for the whole run (real, not a fake)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from tests.redisproc import PrivateRedis, free_port

__all__ = ["free_port", "wait_until"]


def wait_until(cond, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``cond`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port; yields its URL (db 0)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (deploy/install.sh installs it)")
    server = PrivateRedis(tmp_path_factory.mktemp("redis")).start(timeout_s=10)
    yield server.url
    server.stop()


@pytest.fixture()
def redis_url(redis_server: str) -> Iterator[str]:
    """A clean database for one test (flushed before use)."""
    import redis

    r = redis.Redis.from_url(redis_server)
    r.flushdb()
    yield redis_server
    r.flushdb()
