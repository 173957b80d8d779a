"""The guest runner under busybox for the exec-channel tests (tests/execchan/guestsim.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.execchan.guestsim import GuestSim, running_guest


@pytest.fixture()
def guest(tmp_path: Path) -> Iterator[GuestSim]:
    with running_guest(tmp_path) as g:
        yield g
