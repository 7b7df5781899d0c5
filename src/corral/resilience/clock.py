"""The time and the checkpoint of whichever event loop runs, for code that runs under
trio or asyncio.

The time is `trio.current_time()` under trio (so `trio.testing.MockClock` drives it),
the running loop's `time()` under asyncio, and `time.monotonic()` outside any loop. The
checkpoint is trio's under trio; under asyncio it only checks for an anyio
cancellation, since a plain asyncio task is cancelled at its own awaits and a yield to
the loop there costs a whole loop cycle per call. Never sleeps, never fails.
"""

from __future__ import annotations

import asyncio
import time

import anyio
import trio

__all__ = ["checkpoint", "current_time"]


def current_time() -> float:
    """Seconds on the running loop's clock (trio, asyncio), else the monotonic clock."""
    if trio.lowlevel.in_trio_run():
        return trio.current_time()
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


async def checkpoint() -> None:
    """A trio checkpoint under trio; under asyncio, raise if an anyio scope is cancelled."""
    if trio.lowlevel.in_trio_task():
        await trio.lowlevel.checkpoint()
    else:
        await anyio.lowlevel.checkpoint_if_cancelled()
