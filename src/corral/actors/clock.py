"""The time of whichever event loop is running, for code that runs under trio or asyncio.

Under trio it is `trio.current_time()` (so `trio.testing.MockClock` drives it), under
asyncio the running loop's `time()`, and outside any loop `time.monotonic()`. Never
sleeps, never fails.
"""

from __future__ import annotations

import asyncio
import time

import trio

__all__ = ["current_time"]


def current_time() -> float:
    """Seconds on the running loop's clock (trio, asyncio), else the monotonic clock."""
    try:
        return trio.current_time()
    except RuntimeError:
        pass
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()
