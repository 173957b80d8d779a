"""The session test-driver farm (tests/control/conftest.py) for the pool and breaker tests."""

from __future__ import annotations

from tests.control.conftest import Farm, test_farm

__all__ = ["Farm", "test_farm"]
