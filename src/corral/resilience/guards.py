"""Retry and circuit breaking for users' own calls: decorators and call wrappers.

`retry(...)` and `circuit_breaker(...)` wrap the same objects corral's own actors run on
(`RetryPolicy`, `RetryBudget`, `CircuitBreaker`) in the forms a user's code wants: each
is a decorator for a sync or async function, and runs one call with `.run(fn, *args,
**kwargs)` (sync) or `await .arun(fn, *args, **kwargs)` (async). Async forms work under
trio and asyncio alike (through anyio); time is the running loop's clock, so trio's
MockClock drives it. Nothing here starts a task or a thread, or swallows a cancellation
that came from outside.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, final

import anyio
import msgspec

from corral.config import CircuitBreakerConfig, RetryConfig
from corral.resilience.breaker import CircuitBreaker
from corral.resilience.breaker_types import Outcome, StateChangeHook
from corral.resilience.budget import RetryBudget, RetryCounters, RetryStatistics
from corral.resilience.calls import bind, decorate
from corral.resilience.clock import current_time
from corral.resilience.retries import OnRetry, RetryPolicy, call, call_sync

__all__ = ["CircuitBreakerGuard", "Retrying", "circuit_breaker", "retry"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


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
        return decorate(fn, self.run, self.arun)

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
            return call_sync(self.policy, bind(fn, args, kwargs), budget=self._budget,
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
            return await call(self.policy, bind(fn, args, kwargs), budget=self._budget,
                              timeout=self._timeout, on_retry=self._on_retry,
                              stats=self._counters)
        scope = anyio.CancelScope()
        self._aborts.add(scope)
        try:
            return await call(self.policy, bind(fn, args, kwargs), budget=self._budget,
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
        return decorate(fn, self.run, self.arun)

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
        return await self.breaker.call(bind(fn, args, kwargs))


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
