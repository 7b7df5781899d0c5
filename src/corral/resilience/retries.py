"""Retry with backoff and jitter under one deadline: the policy and the loop.

`call(policy, fn, *args)` runs a caller's own async function again after a retryable
failure (`call_sync` a synchronous one). The loop runs in the caller's task, never in an
actor: one actor running every caller's loop would serialise them. What callers of one
target share is the retry budget (a token bucket as in gRPC's retry throttling, so
retries cannot multiply load in an outage) and the statistics: a `RetryBudget` used
directly, or any `Budget`, such as the retry actor's (`corral.runtime.retry_actor`).
This module never retries a client error, never swallows a cancellation that came from
outside the loop, and never sleeps past the deadline.
"""

from __future__ import annotations

import functools
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, TypeVar, TypeVarTuple, final

import anyio
import msgspec
import trio

from corral.config import RetryConfig
from corral.protocol.errors import (
    CLIENT_ERROR_CODES,
    Code,
    CorralError,
    RetryAbortedError,
    TimeoutError,
    resolve_error_name,
)
from corral.resilience.backoff import STRATEGIES, Strategy, base_delay, spread
from corral.resilience.budget import Budget, ReportOutcome, RetryBudget, RetryCounters
from corral.resilience.classify import code_of
from corral.resilience.clock import current_time

__all__ = ["JitterMode", "OnRetry", "RetryPolicy", "call", "call_sync"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

JitterMode = Literal["proportional", "full", "equal", "decorrelated"]
_JITTER_MODES: Final = frozenset({"proportional", "full", "equal", "decorrelated"})

_NEVER_RETRIED: Final[frozenset[Code]] = CLIENT_ERROR_CODES | {Code.CANCELLED}
"""Codes no policy retries, listed or not: the caller's fault, or the caller gave up."""

_rng = random.Random()


@functools.lru_cache(maxsize=64)
def _resolve(names: tuple[str, ...]) -> frozenset[Code]:
    return frozenset(resolve_error_name(name) for name in names)


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """When to retry and how long to wait; the fields and defaults of `RetryConfig`.

    Attributes:
        max_attempts: attempts in all, the first included (1 means never retry).
        strategy: how delays grow: "exponential", "linear", "fixed" or "immediate".
        initial_delay_ms: the delay after the first failure, before jitter.
        max_delay_ms: no delay is longer (a server's retry-after aside, see `call`).
        backoff_multiplier: each retry waits this much longer than the one before.
        jitter: in "proportional" mode, delays spread ± this fraction around the base.
        jitter_mode: "proportional", "full", "equal" or "decorrelated"; see `delay`.
        retryable_errors: code names (`"Timeout"`), enum names (`"TIMEOUT"`) or aliases
            (`"ECONNRESET"` is TransportError); see `is_retryable`.
    """

    max_attempts: int = 3
    strategy: Strategy = "exponential"
    initial_delay_ms: float = 100.0
    max_delay_ms: float = 5000.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.25
    jitter_mode: JitterMode = "proportional"
    retryable_errors: tuple[str, ...] = ("TIMEOUT", "ECONNRESET")

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_delay_ms <= self.max_delay_ms:
            raise ValueError("expected 0 <= initial_delay_ms <= max_delay_ms, got "
                             f"{self.initial_delay_ms} and {self.max_delay_ms}")
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier: expected >= 1, got {self.backoff_multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter: expected a fraction in [0, 1], got {self.jitter}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)}, "
                             f"got {self.strategy!r}")
        if self.jitter_mode not in _JITTER_MODES:
            raise ValueError(f"jitter_mode: expected one of {sorted(_JITTER_MODES)}, "
                             f"got {self.jitter_mode!r}")
        given: Any = self.retryable_errors
        if not isinstance(given, tuple):  # a list from user code: keep it hashable
            msgspec.structs.force_setattr(self, "retryable_errors", tuple(given))
        _resolve(self.retryable_errors)

    @classmethod
    def from_config(cls, config: RetryConfig) -> RetryPolicy:
        """The policy `config` describes: every key but `budget` is a field of the same
        name (`RetryBudget.from_config` takes `budget`)."""
        return cls(max_attempts=config.max_attempts, strategy=config.strategy,
                   initial_delay_ms=float(config.initial_delay_ms),
                   max_delay_ms=float(config.max_delay_ms),
                   backoff_multiplier=config.backoff_multiplier, jitter=config.jitter,
                   jitter_mode=config.jitter_mode,
                   retryable_errors=tuple(config.retryable_errors))

    @property
    def retryable_codes(self) -> frozenset[Code]:
        """The codes `retryable_errors` names, aliases resolved."""
        return _resolve(self.retryable_errors)

    def delay(self, attempt: int, previous: float, rng: random.Random) -> float:
        """Seconds to wait after attempt number `attempt` (1-based) failed.

        The base is `backoff.base_delay` of the strategy: exponential initial·
        multiplier^(attempt-1), linear initial·attempt, fixed initial, immediate 0;
        capped at max. With U uniform in [0, 1):

        - proportional: `backoff.spread`: base ± jitter, the centre lowered near the
          cap so no delay exceeds max: 100, 200, 400 ms ± 25 % by default.
        - full: U·base. equal: base/2 + U·base/2 (AWS architecture blog).
        - decorrelated: min(max, uniform(initial, 3·previous)), where `previous` is the
          delay before (use initial for the first); its own schedule, so neither
          `attempt` nor `strategy` matters (immediate aside, which never waits).

        The `jitter` fraction applies to proportional mode only. No mode returns more
        than `max_delay_ms`.
        """
        initial = self.initial_delay_ms / 1000.0
        cap = self.max_delay_ms / 1000.0
        if self.strategy == "immediate":
            return 0.0
        if self.jitter_mode == "decorrelated":
            return min(cap, rng.uniform(initial, 3.0 * max(previous, initial)))
        base = base_delay(self.strategy, attempt, initial, self.backoff_multiplier, cap)
        if self.jitter_mode == "full":
            return rng.random() * base
        if self.jitter_mode == "equal":
            return base / 2.0 + rng.random() * base / 2.0
        return spread(base, cap, self.jitter, rng.random())

    def is_retryable(self, error: BaseException) -> bool:
        """Whether `error` may be retried under this policy.

        The rule, in order: a client error (InvalidParams, ...) or Cancelled is never
        retried, listed or not; an error whose code (see `corral.resilience.classify.
        code_of`) is not in `retryable_errors` is not retried; a listed corral error is
        retried when its own `retryable` flag says so (the table's value unless the
        raising site decided, as it does for the "by cause" codes); a listed error of any
        other type is retried.
        """
        code = code_of(error)
        if code in _NEVER_RETRIED or code not in _resolve(self.retryable_errors):
            return False
        return error.retryable if isinstance(error, CorralError) else True


# -- the budget, in the caller's task --------------------------------------------


@final
class _LocalBudget:
    """A `RetryBudget` in the caller's own process and thread, used directly."""

    __slots__ = ("_bucket",)

    def __init__(self, bucket: RetryBudget) -> None:
        self._bucket = bucket

    async def request_retry(self) -> bool:
        return self._bucket.request_retry()

    def report(self, outcome: ReportOutcome) -> None:
        self._bucket.settle(outcome)


# -- the loop ------------------------------------------------------------------------


OnRetry = Callable[[int, float, BaseException], object]
_Ending = Literal["success", "failure", "cancelled"]


@final
class _Loop:
    """The state of one `call` or `call_sync`: what was tried, what failed, how it
    ended, and the decision after each failure; the two differ only in how they wait."""

    __slots__ = ("attempts", "charge_failure", "clock", "deadline", "delay_s", "ending",
                 "last_error", "on_retry", "policy", "previous", "rng", "stats")

    def __init__(self, policy: RetryPolicy, deadline: float, on_retry: OnRetry | None,
                 rng: random.Random, stats: RetryCounters | None,
                 clock: Callable[[], float]) -> None:
        self.policy = policy
        self.deadline = deadline
        self.on_retry = on_retry
        self.rng = rng
        self.stats = stats
        self.clock = clock
        self.previous = policy.initial_delay_ms / 1000.0
        self.attempts = 0
        self.delay_s = 0.0
        self.last_error: Exception | None = None
        self.charge_failure = False
        self.ending: _Ending = "cancelled"

    def plan(self, error: Exception) -> float | None:
        """The delay before the next attempt, budget aside, or None to end the loop."""
        self.last_error = error
        policy = self.policy
        if not policy.is_retryable(error):
            return None
        if self.attempts >= policy.max_attempts:
            self.charge_failure = True
            return None
        delay = policy.delay(self.attempts, self.previous, self.rng)
        retry_after_ms = getattr(error, "retry_after_ms", None)
        if isinstance(retry_after_ms, int | float):
            delay = max(delay, retry_after_ms / 1000.0)
        if self.clock() + delay >= self.deadline:
            self.charge_failure = True
            return None
        return delay

    def proceed(self, error: Exception, delay: float | None, granted: bool) -> float:
        """The delay `plan` chose, once the budget `granted` the retry; raises `error`
        when there is none (the loop ends in failure)."""
        if delay is not None and not granted and self.stats is not None:
            self.stats.record_denied()
        if delay is None or not granted:
            self.ending = "failure"
            raise error
        if self.on_retry is not None:
            self.on_retry(self.attempts, delay, error)
        self.previous = delay
        return delay

    async def run(self, fn: Callable[[*Ts], Awaitable[T]], args: tuple[*Ts],
                  budget: Budget | None) -> T:
        while True:
            self.attempts += 1
            try:
                result = await fn(*args)
            except Exception as exc:
                error = exc
            else:
                self.ending = "success"
                return result
            # Decided outside the except block, so a cancellation while consulting the
            # budget or sleeping does not carry this error as its context.
            planned = self.plan(error)
            granted = planned is None or budget is None or await budget.request_retry()
            delay = self.proceed(error, planned, granted)
            slept_from = current_time()
            try:
                await anyio.sleep(delay)
            finally:
                self.delay_s += current_time() - slept_from

    def run_sync(self, fn: Callable[[*Ts], T], args: tuple[*Ts],
                 budget: RetryBudget | None, abort: threading.Event) -> T:
        while True:
            self.attempts += 1
            try:
                result = fn(*args)
            except Exception as exc:
                error = exc
            else:
                self.ending = "success"
                return result
            planned = self.plan(error)
            granted = planned is None or budget is None or budget.request_retry()
            delay = self.proceed(error, planned, granted)
            slept_from = time.monotonic()
            aborted = abort.wait(delay)
            self.delay_s += time.monotonic() - slept_from
            if aborted:
                raise RetryAbortedError(self.attempts, error) from error

    def finish(self, budget: Budget | RetryBudget | None) -> None:
        if self.stats is None and budget is None:
            return
        outcome = ReportOutcome(success=self.ending == "success", attempts=self.attempts,
                                delay_s=self.delay_s, cancelled=self.ending == "cancelled",
                                charge_failure=self.charge_failure and self.ending == "failure")
        if self.stats is not None:
            self.stats.record(outcome)
        if isinstance(budget, RetryBudget):
            budget.settle(outcome)
        elif budget is not None:
            budget.report(outcome)


async def call(policy: RetryPolicy, fn: Callable[[*Ts], Awaitable[T]],
               *args: *Ts, budget: RetryBudget | Budget | None = None,
               deadline: float | None = None, timeout: float | None = None,
               on_retry: OnRetry | None = None, rng: random.Random | None = None,
               stats: RetryCounters | None = None,
               abort: anyio.CancelScope | trio.CancelScope | None = None) -> T:
    """Await `fn(*args)`, again after each retryable failure, until it succeeds or must stop.

    Runs under trio or asyncio (through anyio); times are the running loop's clock
    (`trio.current_time`, so MockClock drives it, or the asyncio loop's `time()`).
    After attempt n fails with an error `policy.is_retryable` accepts, the loop waits
    `policy.delay(n, ...)` seconds (at least the error's `retry_after_ms`, if it
    carries one) and tries again, up to `policy.max_attempts` attempts in all. Before
    each retry it calls `on_retry(n, delay, error)` (n is the attempt that failed, which
    is also the number of the retry about to start), and, if there is a budget, asks it
    first: a refusal ends the loop with that error.

    One deadline bounds all attempts and delays together. An attempt still running at
    the deadline is cancelled; a delay that would end at or after the deadline is not
    slept at all, since no attempt could start in time.

    Args:
        policy: when to retry and how long to wait.
        fn: the async function to call; each attempt calls it afresh with `args`.
        budget: a `RetryBudget` used in this thread, or a shared `Budget` such as
            `ActorBudget`. Each attempt that fails with a retryable error costs a token;
            each success refills a fraction.
        deadline: absolute time on the loop's clock by which the call must be over.
        timeout: seconds from now; an alternative to `deadline`.
        on_retry: a synchronous hook, called before each retry's delay.
        rng: the randomness of the jitter (seed it for repeatable runs).
        stats: counters this call adds to.
        abort: a cancel scope the caller keeps (anyio's, or trio's under trio);
            cancelling it ends the loop with RetryAbortedError. A cancel scope can be
            entered once, so use a fresh one per call.

    Returns:
        What `fn` returned.

    Raises:
        Exception: the error of the last attempt when it is not retryable, when the
            attempts run out, when the budget refuses a retry, or when the deadline
            passes after at least one failed attempt.
        TimeoutError: the deadline passed during the first attempt (or before it).
        RetryAbortedError: `abort` was cancelled; carries the attempts made and the
            last error (also chained as the cause).
        trio.Cancelled, asyncio.CancelledError: a cancellation from outside the loop (an
            enclosing cancel scope, nursery or task.cancel()) propagates as itself,
            never converted: the caller's scope must see it to stop. It is never
            retried.
        ValueError: both `deadline` and `timeout` were given.
    """
    if deadline is not None and timeout is not None:
        raise ValueError("pass a deadline or a timeout, not both")
    started = current_time()
    if timeout is not None:
        deadline = started + timeout
    limit = math.inf if deadline is None else deadline
    port = _LocalBudget(budget) if isinstance(budget, RetryBudget) else budget
    loop = _Loop(policy, limit, on_retry, rng or _rng, stats, current_time)
    try:
        if abort is None and deadline is None:
            # Nothing to catch: no cancel scope, the costliest part of the success path.
            return await loop.run(fn, args, port)
        if abort is None:
            with anyio.CancelScope(deadline=limit) as deadline_scope:
                return await loop.run(fn, args, port)
        else:
            with abort, anyio.CancelScope(deadline=limit) as deadline_scope:
                return await loop.run(fn, args, port)
        if deadline_scope.cancelled_caught:
            loop.ending = "failure"
            if loop.last_error is not None:
                raise loop.last_error
            method = getattr(fn, "__qualname__", type(fn).__name__)
            # What was left of the deadline at the start (none, for one already past).
            raise TimeoutError(method, max(0.0, limit - started), None,
                               current_time() - started)
        raise RetryAbortedError(loop.attempts, loop.last_error) from loop.last_error
    finally:
        loop.finish(port)


def call_sync(policy: RetryPolicy, fn: Callable[[*Ts], T], *args: *Ts,
              budget: RetryBudget | None = None, timeout: float | None = None,
              on_retry: OnRetry | None = None, rng: random.Random | None = None,
              stats: RetryCounters | None = None,
              abort: threading.Event | None = None) -> T:
    """`call` for a synchronous `fn`, in the calling thread: the same policy decides,
    the delays block the thread, times are `time.monotonic`.

    Setting `abort` (from any thread) ends a delay at once with RetryAbortedError; an
    attempt already running finishes first, and the loop then stops. The deadline
    (`timeout` seconds from now) is checked between attempts: a running
    attempt cannot be interrupted, so one that outlives it still returns its result,
    and a failure after it ends the loop with that error. An exception that is not an
    `Exception` (KeyboardInterrupt) ends the loop at once, as a cancellation.

    Raises:
        Exception: as `call`: the last attempt's error when it is not retryable, when
            the attempts, the budget or the time run out.
        RetryAbortedError: `abort` was set; carries the attempts and the last error.
    """
    limit = math.inf if timeout is None else time.monotonic() + timeout
    loop = _Loop(policy, limit, on_retry, rng or _rng, stats, time.monotonic)
    try:
        return loop.run_sync(fn, args, budget, abort or threading.Event())
    finally:
        loop.finish(budget)
