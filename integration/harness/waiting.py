"""Waiting for a condition the tests cannot be told about, bounded: every wait ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL = 0.05


def wait_until(predicate: Callable[[], T], timeout: float = 15.0, what: str = "condition", *,
               poll: float = POLL) -> T:
    """predicate()'s first truthy value, polled every `poll` seconds for at most timeout seconds; AssertionError
    naming `what` then. A test racing a process (stopping CRIU mid-dump) polls faster."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {value!r})")
        time.sleep(poll)
