"""The trio facade's methods as asyncio ones, and `open_runtime`, which runs corral on
the running asyncio loop.

`Runtime` is generated from the public members of `corral.runtime.Runtime`
(`surface`), so it has every method the trio facade has, a method added there
included: a coroutine method runs in the guest trio run and is awaited here; a plain
method does too, and becomes a coroutine here; a method that opens a stream
(`generate`, `generate_choices`, `stream`, `choices`) gives an asyncio stream
(`corral.aio.stream`); a property is read as it is (the loops share one thread). The
typed declarations below are for type checkers only; `tests/test_aio_parity.py`
checks that they and the generated methods match the trio facade.

A bridge and nothing more: it never does again what the trio facade does.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, final

from corral.aio.bridge import Bridge
from corral.aio.stream import ChoiceStreams, TokenStream
from corral.config import RuntimeConfig
from corral.runtime import ChoiceStreams as TrioChoiceStreams
from corral.runtime import Runtime as TrioRuntime
from corral.runtime import TokenStream as TrioTokenStream

if TYPE_CHECKING:
    from corral.actors.child_spec import ChildSpec
    from corral.actors.ref import ActorRef
    from corral.actors.supervisor import Supervisor
    from corral.actors.system import Listener
    from corral.config import FallbackResponse, ModelConfig
    from corral.engine.api import EngineStatistics, FaultKind
    from corral.protocol.gang import DistributedSettings
    from corral.protocol.messages import (
        ChatMessage,
        Completion,
        EngineStep,
        GenerateParams,
        PrefixCacheStatistics,
    )
    from corral.protocol.serving_messages import RegistryState
    from corral.resilience.breaker import CircuitBreaker
    from corral.resilience.breaker_types import BreakerStatistics
    from corral.resilience.budget import RetryStatistics
    from corral.runtime import Health, ModelDescription, ResilienceState, RuntimeStatistics
    from corral.runtime.stream_buffers import StreamBuffer

__all__ = ["ADAPTERS", "Member", "Runtime", "open_runtime", "surface"]

T = TypeVar("T")

Kind = Literal["call", "sync", "stream", "property"]

ADAPTERS: Final[dict[type, type[TokenStream] | type[ChoiceStreams]]] = {
    TrioTokenStream: TokenStream, TrioChoiceStreams: ChoiceStreams}
"""The asyncio stream that reads each kind of trio stream."""


@final
class Member:
    """One public member of the trio facade, and how it crosses to asyncio.

    `kind` is "call" for a coroutine method, "sync" for a plain one (both become
    coroutines), "stream" for a method that opens a stream (`adapter` reads it from
    asyncio) and "property" for a property.
    """

    __slots__ = ("adapter", "kind", "name", "value")

    def __init__(self, name: str, value: Any, kind: Kind,
                 adapter: type[TokenStream] | type[ChoiceStreams] | None = None) -> None:
        self.name = name
        self.value = value
        self.kind = kind
        self.adapter = adapter


def surface() -> list[Member]:
    """The public members of `corral.runtime.Runtime`, each with how it crosses."""
    members = []
    for name, value in vars(TrioRuntime).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            members.append(Member(name, value, "property"))
        elif inspect.iscoroutinefunction(value):
            members.append(Member(name, value, "call"))
        else:
            adapter = _stream_adapter(value)
            members.append(Member(name, value, "sync" if adapter is None else "stream",
                                  adapter))
    return members


def _stream_adapter(method: Callable[..., Any]) -> type[TokenStream] | type[ChoiceStreams] | None:
    """The asyncio stream for a method that opens a trio stream (its return type is an
    async context manager, or an `asynccontextmanager`'s iterator, of one), else None."""
    returns = typing.get_type_hints(method).get("return")
    if typing.get_origin(returns) not in (AsyncIterator, AbstractAsyncContextManager):
        return None
    (item,) = typing.get_args(returns)
    return ADAPTERS.get(item)


@final
class Runtime:
    """The trio facade's methods as asyncio ones. Made by `open_runtime`.

    Each method is the trio facade's method of that name (see `corral.Runtime`), run
    in the guest trio run on this loop's thread. Cancelling the calling task cancels
    the call in trio (a generation leaves the batch at the next engine step) and waits
    until it has. A failed call raises the exception the trio facade raised, as the
    same object. Once the runtime is closed or has failed, calls raise its failure (an
    EscalationError, say) or a retryable ServerError with `details["shutting_down"]`.
    """

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    async def run_in_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(trio_runtime, *args)` in the guest trio run: for trio code that
        needs more than one call (a step listener and the reads around it, say).
        Cancellation and errors cross as for every other call."""
        return await self._bridge.call(lambda rt: fn(rt, *args))

    if TYPE_CHECKING:
        # For type checkers: what `_generate` adds below, one line per trio member.
        @property
        def config(self) -> RuntimeConfig: ...
        @property
        def draining(self) -> bool: ...
        async def domain(self, name: str) -> Supervisor: ...
        async def actor(self, path: str) -> ActorRef: ...
        async def kill(self, path: str) -> None: ...
        async def add_lifecycle_listener(self, listener: Listener) -> Callable[[], None]: ...
        async def circuit_breaker(self, alias: str) -> CircuitBreaker: ...
        async def start_transport(self, spec: ChildSpec) -> ActorRef: ...
        async def load_model(self, path: str, *, alias: str | None = None,
                             fallbacks: tuple[str | FallbackResponse, ...] = (),
                             chat_template: str | None = None,
                             adapter_path: str | None = None,
                             distributed: DistributedSettings | None = None,
                             ) -> ModelDescription: ...
        async def unload_model(self, alias: str) -> None: ...
        async def list_models(self) -> list[ModelDescription]: ...
        async def loadable_models(self) -> list[ModelConfig]: ...
        async def model_expires_at(self, alias: str) -> float | None: ...
        async def keep_model(self, alias: str, keep_alive: float | None) -> None: ...
        async def tokenize(self, model: str | None, text: str, *,
                           add_special_tokens: bool = True) -> list[int]: ...
        async def tokenize_chat(self, model: str | None,
                                messages: list[ChatMessage]) -> list[int]: ...
        async def detokenize(self, model: str | None, ids: list[int]) -> str: ...
        async def count_prompt_tokens(self, request: GenerateParams) -> int: ...
        def generate(self, model: str | None = None, prompt: str | list[int] | None = None,
                     **params: Any) -> TokenStream: ...
        def stream(self, request: GenerateParams) -> TokenStream: ...
        def generate_choices(self, model: str | None = None,
                             prompt: str | list[int] | None = None,
                             **params: Any) -> ChoiceStreams: ...
        def choices(self, request: GenerateParams | Sequence[GenerateParams]
                    ) -> ChoiceStreams: ...
        async def complete(self, model: str | None = None,
                           prompt: str | list[int] | None = None,
                           **params: Any) -> Completion: ...
        async def run(self, request: GenerateParams) -> Completion: ...
        async def drain(self, timeout: float) -> int: ...
        async def health(self) -> Health: ...
        async def registry_state(self, *, timeout: float | None = None) -> RegistryState: ...
        async def retry_statistics(self, alias: str, *,
                                   timeout: float | None = None) -> RetryStatistics: ...
        async def statistics(self) -> RuntimeStatistics: ...
        async def resilience(self) -> ResilienceState: ...
        async def breaker_statistics(self) -> dict[str, BreakerStatistics]: ...
        async def prefix_cache_statistics(self) -> dict[str, PrefixCacheStatistics]: ...
        async def add_step_listener(
            self, alias: str, listener: Callable[[EngineStep], None]) -> Callable[[], None]: ...
        async def engine_statistics(self, alias: str) -> EngineStatistics | None: ...
        async def stream_buffers(self) -> list[StreamBuffer]: ...
        async def inject_fault(self, model: str, kind: FaultKind) -> None: ...


def _generate(member: Member) -> Any:
    """The asyncio form of one member of the trio facade (see the module)."""
    if member.kind == "property":
        read = member.value.fget
        return property(lambda self: read(self._bridge.runtime), doc=member.value.__doc__)
    method = member.value
    if member.kind == "stream":
        adapter = member.adapter
        assert adapter is not None

        @functools.wraps(method)
        def opens(self: Runtime, *args: Any, **kwargs: Any) -> Any:
            return adapter(self._bridge, lambda rt: method(rt, *args, **kwargs))

        opens.__annotations__ = {**method.__annotations__, "return": adapter.__name__}
        opens.__module__ = __name__
        return opens

    awaited = member.kind == "call"

    async def call(rt: TrioRuntime, args: Any, kwargs: Any) -> Any:
        value = method(rt, *args, **kwargs)
        return await value if awaited else value

    @functools.wraps(method)
    async def crosses(self: Runtime, *args: Any, **kwargs: Any) -> Any:
        return await self._bridge.call(lambda rt: call(rt, args, kwargs))

    crosses.__module__ = __name__
    return crosses


for _member in surface():
    setattr(Runtime, _member.name, _generate(_member))
del _member


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
