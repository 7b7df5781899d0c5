"""The resilience toolkit for users' own calls: retry, circuit breaking and fallbacks.

The same objects corral's own actors run on (`RetryPolicy`, `RetryBudget`,
`CircuitBreaker`, one error classification), with the forms a user's code wants: each of
`retry(...)`, `circuit_breaker(...)` and a `Fallback` is a decorator for a sync or async
function, and runs one call with `.run(fn, *args, **kwargs)` (sync) or `await
.arun(fn, *args, **kwargs)` (async). Async forms work under trio and asyncio alike
(through anyio); time is the running loop's clock, so trio's MockClock drives it.
Nothing here starts a task or a thread, or swallows a cancellation that came from
outside.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, TypeVar, cast, final

import anyio
import msgspec

from corral.actors.breaker import CircuitBreaker, Outcome, StateChangeHook
from corral.actors.clock import current_time
from corral.actors.retry import OnRetry, RetryPolicy, call, call_sync
from corral.actors.retry_budget import RetryBudget, RetryCounters, RetryStatistics
from corral.config import CircuitBreakerConfig, RetryConfig
from corral.protocol.errors import CLIENT_ERROR_CODES, Code, code_of

__all__ = [
    "CircuitBreakerGuard",
    "Fallback",
    "FallbackStatistics",
    "Recovered",
    "Retrying",
    "circuit_breaker",
    "retry",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_NOT_RECOVERED: Final[frozenset[Code]] = CLIENT_ERROR_CODES | {Code.CANCELLED}
"""Errors no fallback hides: the caller's own fault, or the caller gave up."""


def _decorate(fn: F, run: Callable[..., Any], arun: Callable[..., Awaitable[Any]]) -> F:
    """`fn` wrapped by `arun` if it is a coroutine function, else by `run`."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return await arun(fn, *args, **kwargs)
        return cast(F, async_wrapper)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(fn, *args, **kwargs)
    return cast(F, wrapper)


def _bind(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
          ) -> Callable[[], T]:
    return functools.partial(fn, *args, **kwargs) if args or kwargs else fn


# -- retry --------------------------------------------------------------------------


@final
class Retrying:
    """A retry policy bound to its budget, deadline and hooks; made by `retry(...)`.

    Use it as a decorator (`@retry(max_attempts=5)`) on a sync or an async function, or
    call through it: `retrying.run(fn, *args)`, `await retrying.arun(fn, *args)`.
    Every call through one `Retrying` shares its budget and statistics.

    Cancellation: a cancellation from outside (a trio cancel scope, `task.cancel()`
    under asyncio) propagates as itself and is never retried. With `abortable=True`,
    `abort()` ends every call in flight with RetryAbortedError: sync calls waiting
    between attempts at once (a running attempt finishes first), async calls at once.
    Being abortable costs each async call a cancel scope, the most expensive part of
    its success path under asyncio (see `corral bench resilience`), so it is opt-in.
    """

    __slots__ = ("_abortable", "_aborts", "_budget", "_counters", "_events", "_on_retry",
                 "_timeout", "policy")

    def __init__(self, policy: RetryPolicy, *, budget: RetryBudget | None = None,
                 timeout: float | None = None, on_retry: OnRetry | None = None,
                 abortable: bool = False) -> None:
        self.policy = policy
        self._budget = budget
        self._timeout = timeout
        self._on_retry = on_retry
        self._abortable = abortable
        self._counters = RetryCounters()
        self._aborts: set[anyio.CancelScope] = set()
        self._events: set[threading.Event] = set()

    @classmethod
    def from_config(cls, config: RetryConfig, *, timeout: float | None = None,
                    on_retry: OnRetry | None = None) -> Retrying:
        """The retry a `calls.retry` section describes, budget included when enabled."""
        budget = RetryBudget.from_config(config.budget) if config.budget.enabled else None
        return cls(RetryPolicy.from_config(config), budget=budget, timeout=timeout,
                   on_retry=on_retry)

    @property
    def budget(self) -> RetryBudget | None:
        return self._budget

    def statistics(self) -> RetryStatistics:
        """Totals over every call made through this object."""
        return self._counters.statistics()

    def __call__(self, fn: F) -> F:
        return _decorate(fn, self.run, self.arun)

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` with retries, blocking this thread between attempts.

        Raises:
            Exception: the last attempt's error when it is not retryable or the
                attempts, the budget or the timeout ran out.
            RetryAbortedError: `abort()` was called while it waited.
        """
        event = threading.Event()
        self._events.add(event)
        try:
            return call_sync(self.policy, _bind(fn, args, kwargs), budget=self._budget,
                             timeout=self._timeout, on_retry=self._on_retry,
                             stats=self._counters, abort=event)
        finally:
            self._events.discard(event)

    async def arun(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """`await fn(*args, **kwargs)` with retries, under trio or asyncio.

        Raises:
            Exception: as `run`.
            TimeoutError: the timeout passed during the first attempt.
            RetryAbortedError: `abort()` was called.
        """
        if not self._abortable:
            return await call(self.policy, _bind(fn, args, kwargs), budget=self._budget,
                              timeout=self._timeout, on_retry=self._on_retry,
                              stats=self._counters)
        scope = anyio.CancelScope()
        self._aborts.add(scope)
        try:
            return await call(self.policy, _bind(fn, args, kwargs), budget=self._budget,
                              timeout=self._timeout, on_retry=self._on_retry,
                              stats=self._counters, abort=scope)
        finally:
            self._aborts.discard(scope)

    def abort(self) -> None:
        """End the calls in flight with RetryAbortedError. Call it from the thread of
        the event loop that runs the async calls (any thread for sync calls).

        Raises:
            ValueError: made without `abortable=True`.
        """
        if not self._abortable:
            raise ValueError("this Retrying was made without abortable=True")
        for scope in tuple(self._aborts):
            scope.cancel()
        for event in tuple(self._events):
            event.set()


def retry(policy: RetryPolicy | None = None, *, budget: RetryBudget | None = None,
          timeout: float | None = None, on_retry: OnRetry | None = None,
          abortable: bool = False, **fields: Any) -> Retrying:
    """A `Retrying` with `policy`, or with a `RetryPolicy(**fields)`.

    `fields` are the keys of `calls.retry` in config/runtime.yaml (`max_attempts`,
    `strategy`, `initial_delay_ms`, `max_delay_ms`, `backoff_multiplier`, `jitter`,
    `jitter_mode`, `retryable_errors`); `budget` is `RetryBudget(max_tokens,
    token_ratio)`; `timeout` is one deadline in seconds over all attempts; `abortable`
    allows `Retrying.abort()`.

    Raises:
        ValueError: both a policy and fields, or a field out of range.
    """
    if policy is not None and fields:
        raise ValueError("pass a RetryPolicy or its fields, not both")
    return Retrying(policy or RetryPolicy(**fields), budget=budget, timeout=timeout,
                    on_retry=on_retry, abortable=abortable)


# -- circuit breaker ----------------------------------------------------------------


@final
class CircuitBreakerGuard:
    """A `CircuitBreaker` as a decorator and a call wrapper; made by `circuit_breaker`.

    Async calls (`arun`, decorated coroutine functions) go through `CircuitBreaker.call`:
    under trio or asyncio, cancellation counts as neither success nor failure and gives
    a half-open probe's slot back. Sync calls (`run`) serialise their bookkeeping on a
    lock, so threads may share the guard; the call itself runs unlocked.

    Raises (from a call):
        CircuitBreakerOpenError: the breaker refused; the function was not called.
    """

    __slots__ = ("_lock", "breaker")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self._lock = threading.Lock()

    def __call__(self, fn: F) -> F:
        return _decorate(fn, self.run, self.arun)

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        breaker = self.breaker
        with self._lock:
            permit = breaker.acquire()
        started = current_time()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            with self._lock:
                breaker.record(permit, breaker.outcome_of(exc), current_time() - started)
            raise
        with self._lock:
            breaker.record(permit, Outcome.SUCCESS, current_time() - started)
        return result

    async def arun(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        return await self.breaker.call(_bind(fn, args, kwargs))


def circuit_breaker(breaker: CircuitBreaker | str = "default", *,
                    on_state_change: StateChangeHook | None = None,
                    **fields: Any) -> CircuitBreakerGuard:
    """A guard around `breaker`, or around a new `CircuitBreaker(name,
    CircuitBreakerConfig(**fields))`.

    `fields` are the keys of `calls.circuit_breaker` in config/runtime.yaml
    (`failure_threshold`, `recovery_timeout_ms`, `half_open_max_calls`, ...).

    Raises:
        ValueError: a breaker and fields both, or a field out of range.
    """
    if isinstance(breaker, CircuitBreaker):
        if fields or on_state_change is not None:
            raise ValueError("pass a CircuitBreaker or the settings of a new one, not both")
        return CircuitBreakerGuard(breaker)
    try:
        config = msgspec.convert(fields, CircuitBreakerConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    return CircuitBreakerGuard(CircuitBreaker(breaker, config, on_state_change=on_state_change))


# -- fallbacks ------------------------------------------------------------------------


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
        return _decorate(fn, self.run, self.arun)

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
