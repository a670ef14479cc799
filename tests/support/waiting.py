"""Waiting, bounded, for something a real process does in its own time."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]

# Outcomes are asserted, never times: this only bounds the wait.
_WAIT = 30.0


def wait_until(condition: Callable[[], object], what: str) -> None:
    """Poll ``condition`` until it is true, for 30 s at the most.

    Raises:
        AssertionError: The time ran out; the message names ``what``.
    """
    deadline = time.monotonic() + _WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
