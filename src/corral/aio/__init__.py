"""corral from asyncio: the trio runtime as a guest on the running asyncio loop.

`async with corral.aio.open_runtime(config) as rt` starts trio in guest mode
(`trio.lowlevel.start_guest_run`) on the asyncio loop's own thread, opens the trio facade
(`corral.runtime.open_runtime`) in it, and offers every method of the trio facade,
generated from it: coroutines, and asyncio streams for the methods that open one.
The two loops take turns on one thread, so nothing crosses a thread per call or per
token: asyncio hands trio a callback (`TrioToken.run_sync_soon`), and trio completes an
asyncio future directly. Errors cross as the very exception objects trio raised;
cancelling the asyncio caller cancels its trio task.

This module is a bridge and nothing more: it never runs MLX (each engine has its own
thread), never blocks the loop, and never does again what the trio facade does.
"""

from corral.aio.runtime import Runtime as Runtime
from corral.aio.runtime import open_runtime as open_runtime
from corral.aio.stream import ChoiceStreams as ChoiceStreams
from corral.aio.stream import TokenStream as TokenStream

__all__ = ["ChoiceStreams", "Runtime", "TokenStream", "open_runtime"]
