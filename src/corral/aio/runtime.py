"""The trio facade's operations as asyncio coroutines, and `open_runtime`, which runs
corral on the running asyncio loop.

A bridge and nothing more: it never does again what the trio facade does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar, final

from corral.aio.bridge import Bridge
from corral.aio.stream import TokenStream
from corral.config import RuntimeConfig
from corral.protocol.messages import Completion
from corral.runtime import (
    Health,
    ModelDescription,
    ResilienceState,
    RuntimeStatistics,
)
from corral.runtime import Runtime as TrioRuntime

T = TypeVar("T")

@final
class Runtime:
    """The trio facade's operations as asyncio coroutines. Made by `open_runtime`.

    Each call runs in the guest trio run on this loop's thread. Cancelling the calling
    task cancels the call in trio (a generation leaves the batch at the next engine
    step) and waits until it has. A failed call raises the exception the trio facade
    raised, as the same object. Once the runtime is closed or has failed, calls raise
    its failure (an EscalationError, say) or a retryable ServerError with
    `details["shutting_down"]`.
    """

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    @property
    def config(self) -> RuntimeConfig:
        return self._bridge.runtime.config

    async def load_model(self, path: str, *, alias: str | None = None,
                         fallbacks: tuple[str, ...] = ()) -> ModelDescription:
        """See `corral.Runtime.load_model`."""
        return await self._bridge.call(
            lambda rt: rt.load_model(path, alias=alias, fallbacks=fallbacks))

    async def unload_model(self, alias: str) -> None:
        """See `corral.Runtime.unload_model`."""
        await self._bridge.call(lambda rt: rt.unload_model(alias))

    async def list_models(self) -> list[ModelDescription]:
        return await self._bridge.call(_sync(TrioRuntime.list_models))

    async def tokenize(self, model: str | None, text: str, *,
                       add_special_tokens: bool = True) -> list[int]:
        return await self._bridge.call(
            lambda rt: rt.tokenize(model, text, add_special_tokens=add_special_tokens))

    async def detokenize(self, model: str | None, ids: list[int]) -> str:
        return await self._bridge.call(lambda rt: rt.detokenize(model, ids))

    def generate(self, model: str | None = None, prompt: str | list[int] | None = None,
                 **params: Any) -> TokenStream:
        """Start a generation: `async with rt.generate(...) as stream: async for chunk
        in stream`. Arguments and errors are those of `corral.Runtime.generate`."""
        return TokenStream(self._bridge, model, prompt, params)

    async def complete(self, model: str | None = None, prompt: str | list[int] | None = None,
                       **params: Any) -> Completion:
        """Generate to the end in trio and return the whole completion (one crossing,
        not one per chunk); see `corral.Runtime.complete`."""
        return await self._bridge.call(lambda rt: rt.complete(model, prompt, **params))

    async def health(self) -> Health:
        return await self._bridge.call(_sync(TrioRuntime.health))

    async def statistics(self) -> RuntimeStatistics:
        return await self._bridge.call(lambda rt: rt.statistics())

    async def resilience(self) -> ResilienceState:
        """Rolling error metrics and breakers; see `corral.Runtime.resilience`."""
        return await self._bridge.call(_sync(TrioRuntime.resilience))

    async def run_in_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(trio_runtime, *args)` in the guest trio run: the way to reach
        the rest of the trio facade (`add_step_listener`, `drain`, `inject_fault`...).
        `fn` is trio code; cancellation and errors cross as for every other call."""
        return await self._bridge.call(lambda rt: fn(rt, *args))


def _sync(fn: Callable[[TrioRuntime], T]) -> Callable[[TrioRuntime], Awaitable[T]]:
    async def run(runtime: TrioRuntime) -> T:
        return fn(runtime)

    return run


@asynccontextmanager
async def open_runtime(config: RuntimeConfig | None = None, *,
                       models: Mapping[str, str] | None = None) -> AsyncIterator[Runtime]:
    """Run corral on the running asyncio loop, as `corral.open_runtime` runs it on trio.

    Starts a trio guest run on this loop's thread, opens the runtime in it and loads
    `config.generation.models` and `models` (alias → path). Leaving the block ends every
    generation still open (their readers get a retryable ServerError with
    `details["shutting_down"]`), stops the runtime gracefully and ends the guest run;
    it waits for that, also when cancelled (as when `asyncio.run` stops its loop and
    cancels the remaining tasks). Do not stop the loop by other means while the block
    is open: trio must run to its end.

    One runtime per event loop (trio runs once per thread); it serves several models.

    Raises:
        EngineClientError: ModelLoadError for a model that fails to load.
        EscalationError: the root gave up (restart intensity exceeded); raised from the
            block's exit, and from every call made after it happened.
        RuntimeError: trio already runs on this thread.
    """
    bridge = Bridge(asyncio.get_running_loop())
    await bridge.start(config, models)
    try:
        yield Runtime(bridge)
    finally:
        await bridge.aclose()
