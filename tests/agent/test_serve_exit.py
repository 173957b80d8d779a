"""A daemon whose Celery worker stopped on an unrecoverable error exits non-zero (one line), so a
supervisor's on-failure rule restarts it; a shutdown (exit code 0) returns normally."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from provisioner.errors import EXIT_UNAVAILABLE, UnavailableError
from provisioner.runtime import Runtime, serve


class StubWorker:
    """Celery's WorkController as serve() sees it: start() returns, exitcode says how it stopped."""

    def __init__(self, exitcode: int | None, **_: Any) -> None:
        self.exitcode: int | None = None
        self._then = exitcode

    def start(self) -> None:
        self.exitcode = self._then


def _rt(exitcode: int | None) -> Runtime:
    app = SimpleNamespace(Worker=lambda **kw: StubWorker(exitcode, **kw))
    return cast(Runtime, SimpleNamespace(app=app))


@pytest.mark.parametrize("code", [None, 0])
def test_a_shutdown_returns(code: int | None) -> None:
    serve(_rt(code), "host.hv1", "agent-hv1", 1)


def test_an_unrecoverable_error_is_an_exit_code() -> None:
    with pytest.raises(UnavailableError, match=r"^agent-hv1 stopped with exit code 1 ") as err:
        serve(_rt(1), "host.hv1", "agent-hv1", 1)
    assert err.value.exit_code == EXIT_UNAVAILABLE
