"""Shared helpers for the test suite: deadlines instead of sleeps, and strict skips."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

STRICT = os.environ.get("WATCHKEEPER_STRICT_TESTS") == "1"


def wait_until(condition: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.02,
               message: str = "") -> T:
    """Poll `condition` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s: {message or condition}")
        time.sleep(interval_s)


def require(available: bool, reason: str) -> None:
    """Skip when a component is absent; in strict mode (CI) a missing component fails instead."""
    if available:
        return
    if STRICT:
        pytest.fail(f"strict mode: required component missing: {reason}")
    pytest.skip(reason)
