"""Fallbacks for users' own calls: what answers when a call fails.

A `Fallback` (cached last good result, a default value, another call, or a chain of
them) is a decorator for a sync or async function and a call wrapper (`run`, `arun`),
under trio and asyncio alike. It never hides a client error or a cancellation: when no
strategy can answer, the call's own error propagates.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, TypeVar, cast, final

import msgspec

from corral.protocol.errors import CLIENT_ERROR_CODES, Code
from corral.resilience.calls import decorate
from corral.resilience.classify import code_of
from corral.resilience.clock import current_time

__all__ = ["CachedFallback", "CallFallback", "DefaultFallback", "Fallback", "FallbackChain",
           "FallbackStatistics", "Recovered", "default_key"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_NOT_RECOVERED: Final[frozenset[Code]] = CLIENT_ERROR_CODES | {Code.CANCELLED}
"""Errors no fallback hides: the caller's own fault, or the caller gave up."""


class Recovered(msgspec.Struct, frozen=True):
    """A value a fallback gave in place of a failed call, and which strategy gave it
    ("cached", "default" or "call")."""

    value: Any
    source: str


class FallbackStatistics(msgspec.Struct, frozen=True):
    """What a fallback did.

    Attributes:
        served: failures it answered.
        hits: cached lookups that found a live entry (cached only; else 0).
        misses: cached lookups that found none, or only an expired one.
        expired: misses whose entry had outlived the TTL.
        entries: results held now (cached only).
    """

    served: int = 0
    hits: int = 0
    misses: int = 0
    expired: int = 0
    entries: int = 0


def default_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """The cache key of a call: its arguments, which must then be hashable."""
    return (args, tuple(sorted(kwargs.items()))) if kwargs else args


class Fallback:
    """What answers when a call fails: build one with `Fallback.cached(ttl)`,
    `Fallback.default(value)`, `Fallback.call(fn)` or `Fallback.chain(...)`.

    Used as a decorator or through `run`/`arun`, it remembers each success (for the
    cached strategy) and, when the call raises, answers in its place. It never hides
    a client error (InvalidParams and the like) or a cancellation; when no strategy
    can answer, the call's own error propagates.
    """

    source: str = "fallback"

    def __init__(self) -> None:
        self._served = 0

    # -- constructors -----------------------------------------------------------

    @staticmethod
    def cached(ttl: float, *, max_entries: int = 1024,
               key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable] = default_key,
               clock: Callable[[], float] = current_time) -> CachedFallback:
        return CachedFallback(ttl, max_entries=max_entries, key=key, clock=clock)

    @staticmethod
    def default(value: Any) -> DefaultFallback:
        return DefaultFallback(value)

    @staticmethod
    def call(fn: Callable[..., Any]) -> CallFallback:
        return CallFallback(fn)

    @staticmethod
    def chain(*fallbacks: Fallback) -> FallbackChain:
        return FallbackChain(fallbacks)

    # -- the strategy ---------------------------------------------------------------

    def remember(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> None:
        """Note a successful call (only the cached strategy keeps anything)."""

    def recover(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Recovered | None:
        """An answer for a failed call with these arguments, or None."""
        raise NotImplementedError

    async def arecover(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> Recovered | None:
        """`recover`, awaiting a coroutine function given to `Fallback.call`."""
        return self.recover(args, kwargs)

    def statistics(self) -> FallbackStatistics:
        return FallbackStatistics(served=self._served)

    # -- use ------------------------------------------------------------------------

    def __call__(self, fn: F) -> F:
        return decorate(fn, self.run, self.arun)

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            if code_of(exc) in _NOT_RECOVERED:
                raise
            recovered = self.recover(args, kwargs)
            if recovered is None:
                raise
            return cast(T, recovered.value)
        self.remember(args, kwargs, value)
        return value

    async def arun(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        try:
            value = await fn(*args, **kwargs)
        except Exception as exc:
            if code_of(exc) in _NOT_RECOVERED:
                raise
            error = exc
        else:
            self.remember(args, kwargs, value)
            return value
        recovered = await self.arecover(args, kwargs)
        if recovered is None:
            raise error
        return cast(T, recovered.value)

    def _serve(self, value: Any) -> Recovered:
        self._served += 1
        return Recovered(value, self.source)


@final
class CachedFallback(Fallback):
    """The last good result for the same arguments, while younger than `ttl` seconds.

    At most `max_entries` keys are kept, the least recently stored dropped first.
    Times are the running loop's clock (`clock`), so MockClock drives the TTL.
    """

    source = "cached"

    def __init__(self, ttl: float, *, max_entries: int = 1024,
                 key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable] = default_key,
                 clock: Callable[[], float] = current_time) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError(f"expected ttl > 0 and max_entries >= 1, got {ttl} and "
                             f"{max_entries}")
        super().__init__()
        self.ttl = ttl
        self._max_entries = max_entries
        self._key = key
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._expired = 0

    def remember(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> None:
        self.store(self._key(args, kwargs), value)

    def store(self, key: Hashable, value: Any) -> None:
        """Keep `value` as the last good result for `key`."""
        with self._lock:
            self._entries[key] = (self._clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def recover(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Recovered | None:
        return self.lookup(self._key(args, kwargs))

    def lookup(self, key: Hashable) -> Recovered | None:
        """The live entry for `key`, counted as a hit, or None, counted as a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry[0] >= self.ttl:
                del self._entries[key]
                self._expired += 1
                entry = None
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
        return self._serve(entry[1])

    def statistics(self) -> FallbackStatistics:
        return FallbackStatistics(served=self._served, hits=self._hits, misses=self._misses,
                                  expired=self._expired, entries=len(self._entries))


@final
class DefaultFallback(Fallback):
    """Always `value`."""

    source = "default"

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def recover(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Recovered | None:
        return self._serve(self.value)


@final
class CallFallback(Fallback):
    """`fn(*args, **kwargs)`: another way to the same answer (a second service, a
    smaller model). If it raises, this strategy has no answer. A coroutine function
    works with async calls only."""

    source = "call"

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def recover(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Recovered | None:
        if inspect.iscoroutinefunction(self.fn):
            raise TypeError("Fallback.call with a coroutine function serves async calls only")
        try:
            return self._serve(self.fn(*args, **kwargs))
        except Exception:
            return None

    async def arecover(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> Recovered | None:
        try:
            value = self.fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
        except Exception:
            return None
        return self._serve(value)


@final
class FallbackChain(Fallback):
    """Each fallback in turn until one answers; every one remembers each success."""

    def __init__(self, fallbacks: tuple[Fallback, ...]) -> None:
        if not fallbacks:
            raise ValueError("a chain needs at least one fallback")
        super().__init__()
        self.fallbacks = fallbacks

    def remember(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> None:
        for fallback in self.fallbacks:
            fallback.remember(args, kwargs, value)

    def recover(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Recovered | None:
        for fallback in self.fallbacks:
            recovered = fallback.recover(args, kwargs)
            if recovered is not None:
                self._served += 1
                return recovered
        return None

    async def arecover(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> Recovered | None:
        for fallback in self.fallbacks:
            recovered = await fallback.arecover(args, kwargs)
            if recovered is not None:
                self._served += 1
                return recovered
        return None
