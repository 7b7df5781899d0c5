"""Circuit breakers: a pure state machine that decides from recorded outcomes and a clock.

`CircuitBreaker` decides from recorded outcomes and an injected clock whether a call may
go through. CLOSED admits calls and counts failures; OPEN rejects them until the recovery
timeout passes; HALF_OPEN admits a few probes whose results close or reopen it; DISABLED
always admits and FORCED_OPEN always rejects, and only an operator leaves either.
The actor that shares one breaker between tasks is `corral.runtime.breaker_actor`.
This module never does I/O, never sleeps, never reads the wall clock behind its
caller's back, and knows nothing of MLX or of what the calls it guards do.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, final

import msgspec
import trio

from corral.config import CircuitBreakerConfig
from corral.logging import get_logger
from corral.protocol.errors import CLIENT_ERROR_CODES, CircuitBreakerOpenError, Code, CorralError
from corral.resilience.breaker_types import (
    BreakerStatistics,
    Outcome,
    Permit,
    Reason,
    State,
    StateChangeHook,
    Transition,
)
from corral.resilience.clock import checkpoint, current_time

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_log = get_logger("corral.breaker")

# Generations are unique in the process, not per breaker, so a permit issued by one
# breaker (or by an incarnation of a BreakerActor that has since restarted) can never
# pass for a permit of another.
_generations = itertools.count(1)


@final
class CircuitBreaker:
    """A circuit breaker as a pure state machine: outcomes and a clock in, decisions out.

    CLOSED trips to OPEN after `failure_threshold` consecutive failures (the count
    starts over after `failure_window_ms` without a failure), or, when configured, when
    the failure rate or slow-call rate over the sliding window reaches its threshold
    once the window holds `minimum_calls` calls (capped at the window size for a count
    window; a time window spans `sliding_window_size` ms).
    OPEN becomes HALF_OPEN once `recovery_timeout_ms` has passed, noticed lazily by
    the next call to any method. HALF_OPEN lets at most `half_open_max_calls` probes
    out at once; `half_open_success_threshold` successes close it, one failure (or a
    slow success, when slow calls are configured) reopens it. Every transition starts a
    new generation: results of permits issued before it are counted in the statistics
    and otherwise ignored.

    Every method but `call` is synchronous, so atomic with respect to other tasks: no
    checkpoint, no I/O, so tasks of one event loop may share a breaker (threads must
    serialise, as `corral.resilience.CircuitBreakerGuard.run` does). The clock is only
    read, in seconds; the default, `clock.current_time`, is trio's clock under trio
    (MockClock drives it), the asyncio loop's under asyncio, else `time.monotonic`.

    Args:
        name: the circuit's name, carried in permits, events and errors.
        config: thresholds and timeouts.
        clock: returns the time in seconds.
        on_state_change: called with every Transition, after the state changed. What it
            raises propagates out of the method that caused the transition.
    """

    __slots__ = ("_clock", "_config", "_consecutive", "_count_window", "_failure_window",
                 "_failures", "_generation", "_ignored", "_last_failure_at",
                 "_last_transition", "_late", "_minimum_calls", "_name", "_next_id",
                 "_on_state_change", "_open_total", "_opened_at", "_probe_successes", "_probes",
                 "_recovery", "_rejected", "_slow", "_slow_calls", "_state", "_successes",
                 "_transitions", "_window", "_window_failures", "_window_slow",
                 "_window_span", "_windowed")

    def __init__(self, name: str, config: CircuitBreakerConfig = CircuitBreakerConfig(), *,
                 clock: Callable[[], float] = current_time,
                 on_state_change: StateChangeHook | None = None) -> None:
        self._name = name
        self._config = config
        self._clock = clock
        self._on_state_change = on_state_change
        self._recovery = config.recovery_timeout_ms / 1000.0
        self._failure_window = config.failure_window_ms / 1000.0
        self._slow = (None if config.slow_call_duration_ms is None
                      else config.slow_call_duration_ms / 1000.0)
        self._windowed = config.failure_rate_threshold is not None or self._slow is not None
        self._count_window = config.sliding_window_type == "count"
        # A count window holds that many calls; a time window spans that many ms.
        self._window_span = (float(config.sliding_window_size) if self._count_window
                             else config.sliding_window_size / 1000.0)
        self._minimum_calls = (min(config.minimum_calls, config.sliding_window_size)
                               if self._count_window else config.minimum_calls)
        self._state = State.CLOSED
        self._generation = next(_generations)
        self._next_id = 0
        self._opened_at = -math.inf
        self._open_total = 0.0
        self._consecutive = 0
        self._last_failure_at = -math.inf
        self._probes: set[int] = set()
        self._probe_successes = 0
        self._window: deque[tuple[float, bool, bool]] = deque()
        self._window_failures = 0
        self._window_slow = 0
        self._successes = 0
        self._failures = 0
        self._ignored = 0
        self._slow_calls = 0
        self._late = 0
        self._rejected = 0
        self._transitions = 0
        self._last_transition: Transition | None = None

    # -- reading ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> CircuitBreakerConfig:
        return self._config

    @property
    def state(self) -> State:
        """The state now; reading it performs a due OPEN -> HALF_OPEN transition."""
        self._poll(self._clock())
        return self._state

    def statistics(self) -> BreakerStatistics:
        """A snapshot; like `state`, it performs a due OPEN -> HALF_OPEN transition."""
        now = self._clock()
        self._poll(now)
        self._evict(now)
        return BreakerStatistics(
            circuit=self._name,
            state=self._state,
            failure_count=self._failure_count(now),
            window_calls=len(self._window),
            window_failures=self._window_failures,
            window_slow_calls=self._window_slow,
            successes=self._successes,
            failures=self._failures,
            ignored=self._ignored,
            slow_calls=self._slow_calls,
            late=self._late,
            rejected=self._rejected,
            half_open_permits=len(self._probes),
            transitions=self._transitions,
            last_transition=self._last_transition,
            time_open_s=self._open_total + (now - self._opened_at if self._is_open() else 0.0),
        )

    # -- the call protocol -------------------------------------------------------------

    def acquire(self) -> Permit:
        """Take a permit for one call; give it back with `record` or `release`.

        Raises:
            CircuitBreakerOpenError: OPEN (retry_after_ms is the time left until
                HALF_OPEN); HALF_OPEN with all `half_open_max_calls` probes out
                (retry_after_ms is `recovery_timeout_ms`, the wait should a probe fail
                and reopen the circuit); FORCED_OPEN (`recovery_timeout_ms` too, as a
                hint: only an operator ends it).
        """
        now = self._clock()
        self._poll(now)
        state = self._state
        if state is State.HALF_OPEN:
            if len(self._probes) >= self._config.half_open_max_calls:
                raise self._reject(now)
            permit = self._issue(now)
            self._probes.add(permit.id)
            return permit
        if state is State.OPEN or state is State.FORCED_OPEN:
            raise self._reject(now)
        return self._issue(now)

    def record(self, permit: Permit, outcome: Outcome, duration: float | None = None) -> None:
        """Give `permit` back with the outcome of its call.

        Args:
            permit: from `acquire` on this breaker; record each permit once (a probe
                permit recorded twice counts as late the second time).
            outcome: success, failure, or ignored (gives the permit back, no more).
            duration: seconds the call took, or to its first token; with
                `slow_call_duration_ms` configured, at least that much is a slow call.
        """
        now = self._clock()
        self._poll(now)
        slow = (outcome is not Outcome.IGNORED and self._slow is not None
                and duration is not None and duration >= self._slow)
        if outcome is Outcome.SUCCESS:
            self._successes += 1
        elif outcome is Outcome.FAILURE:
            self._failures += 1
        else:
            self._ignored += 1
        self._slow_calls += slow
        if permit.generation != self._generation:
            self._late += 1
            return
        if self._state is State.HALF_OPEN:
            self._record_probe(permit, outcome, slow, now)
        elif self._state is State.CLOSED and outcome is not Outcome.IGNORED:
            self._record_closed(outcome is Outcome.FAILURE, slow, now)

    def release(self, permit: Permit) -> None:
        """Give `permit` back unused: the same as recording an ignored outcome."""
        self.record(permit, Outcome.IGNORED)

    @staticmethod
    def outcome_of(error: BaseException | None) -> Outcome:
        """The outcome of a call that raised `error` (None: it returned).

        Ignored: errors that blame the caller (the client codes of the error table,
        and msgspec validation), cancellation (trio.Cancelled, the Cancelled code, so
        RetryAbortedError too) and BaseExceptions that are not Exceptions
        (KeyboardInterrupt, SystemExit). An exception group is a failure if any of its
        leaves is. Any other exception is a failure.
        """
        if error is None:
            return Outcome.SUCCESS
        if isinstance(error, BaseExceptionGroup):
            leaves = (CircuitBreaker.outcome_of(e) for e in error.exceptions)
            return Outcome.FAILURE if Outcome.FAILURE in leaves else Outcome.IGNORED
        if isinstance(error, CorralError):
            ignored = error.code in CLIENT_ERROR_CODES or error.code is Code.CANCELLED
            return Outcome.IGNORED if ignored else Outcome.FAILURE
        if isinstance(error, (trio.Cancelled, msgspec.ValidationError)):
            return Outcome.IGNORED
        return Outcome.FAILURE if isinstance(error, Exception) else Outcome.IGNORED

    async def call(self, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        """`await fn(*args)` through the breaker; its result or exception passes through.

        The outcome is recorded by `outcome_of`, with the call's duration. Cancellation
        (before or during the call; trio's or asyncio's) gives the permit back as an
        ignored outcome, so a cancelled probe frees its slot at once. Always a trio
        checkpoint under trio (`clock.checkpoint`). Runs under trio or asyncio.

        Raises:
            CircuitBreakerOpenError: the breaker refused the call; `fn` was not called.
        """
        await checkpoint()
        permit = self.acquire()
        started = self._clock()
        try:
            result = await fn(*args)
        except BaseException as exc:
            self.record(permit, self.outcome_of(exc), self._clock() - started)
            raise
        self.record(permit, Outcome.SUCCESS, self._clock() - started)
        return result

    # -- operator controls ---------------------------------------------------------

    def force_open(self) -> None:
        """Reject every call until `reset` (or `disable`); no recovery timeout applies."""
        self._command(State.FORCED_OPEN, Reason.FORCE_OPEN)

    def disable(self) -> None:
        """Admit every call and never trip until `reset` (or `force_open`)."""
        self._command(State.DISABLED, Reason.DISABLE)

    def reset(self) -> None:
        """Go to CLOSED with all counts cleared (a CLOSED breaker just clears them)."""
        self._command(State.CLOSED, Reason.RESET)

    # -- internals -------------------------------------------------------------------

    def _command(self, target: State, reason: Reason) -> None:
        now = self._clock()
        self._poll(now)
        if self._state is target:
            self._clear_counts()
        else:
            self._move(target, reason, now)

    def _is_open(self) -> bool:
        return self._state is State.OPEN or self._state is State.FORCED_OPEN

    def _poll(self, now: float) -> None:
        if self._state is State.OPEN:
            due = self._opened_at + self._recovery
            if now >= due:
                self._move(State.HALF_OPEN, Reason.RECOVERY_TIMEOUT, due)

    def _issue(self, now: float) -> Permit:
        self._next_id += 1
        return Permit(self._name, self._generation, self._next_id, self._state, now)

    def _reject(self, now: float) -> CircuitBreakerOpenError:
        self._rejected += 1
        if self._state is State.OPEN:
            left = (self._opened_at + self._recovery - now) * 1000.0
            retry_after_ms = max(1, math.ceil(round(left, 6)))
        else:
            retry_after_ms = self._config.recovery_timeout_ms
        return CircuitBreakerOpenError(retry_after_ms, self._state.value, self._name)

    def _record_probe(self, permit: Permit, outcome: Outcome, slow: bool, now: float) -> None:
        if permit.id not in self._probes:
            self._late += 1
            return
        self._probes.discard(permit.id)
        if outcome is Outcome.FAILURE:
            self._move(State.OPEN, Reason.PROBE_FAILED, now, failure_count=1)
        elif outcome is Outcome.SUCCESS:
            if slow:
                self._move(State.OPEN, Reason.PROBE_SLOW, now)
                return
            self._probe_successes += 1
            if self._probe_successes >= self._config.half_open_success_threshold:
                self._move(State.CLOSED, Reason.PROBES_SUCCEEDED, now)

    def _record_closed(self, failed: bool, slow: bool, now: float) -> None:
        config = self._config
        if failed:
            self._consecutive = self._failure_count(now) + 1
            self._last_failure_at = now
            if self._consecutive >= config.failure_threshold:
                self._move(State.OPEN, Reason.FAILURE_THRESHOLD, now,
                           failure_count=self._consecutive)
                return
        else:
            self._consecutive = 0
        if not self._windowed:
            return
        self._push(now, failed, slow)
        calls = len(self._window)
        if calls < self._minimum_calls:
            return
        # Rates are compared as quotients: failures >= rate * calls misjudges 3 of 10
        # against 0.3, since 0.3 * 10 is a hair above 3 in floating point.
        failure_rate = config.failure_rate_threshold
        slow_rate = config.slow_call_rate_threshold
        if failure_rate is not None and self._window_failures / calls >= failure_rate:
            self._move(State.OPEN, Reason.FAILURE_RATE, now, failure_count=self._window_failures)
        elif self._slow is not None and self._window_slow / calls >= slow_rate:
            self._move(State.OPEN, Reason.SLOW_CALL_RATE, now,
                       failure_count=self._window_failures)

    def _failure_count(self, now: float) -> int:
        if now - self._last_failure_at >= self._failure_window:
            return 0
        return self._consecutive

    def _push(self, now: float, failed: bool, slow: bool) -> None:
        if self._count_window and len(self._window) >= self._window_span:
            self._drop_oldest()
        self._window.append((now, failed, slow))
        self._window_failures += failed
        self._window_slow += slow
        self._evict(now)

    def _evict(self, now: float) -> None:
        if self._count_window:
            return
        horizon = now - self._window_span
        while self._window and self._window[0][0] <= horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, failed, slow = self._window.popleft()
        self._window_failures -= failed
        self._window_slow -= slow

    def _clear_counts(self) -> None:
        self._consecutive = 0
        self._last_failure_at = -math.inf
        self._probes.clear()
        self._probe_successes = 0
        self._window.clear()
        self._window_failures = 0
        self._window_slow = 0

    def _move(self, target: State, reason: Reason, now: float, *,
              failure_count: int | None = None) -> None:
        previous = self._state
        if self._is_open():
            self._open_total += now - self._opened_at
        if failure_count is None:
            failure_count = self._failure_count(now) if previous is State.CLOSED else 0
        self._state = target
        self._generation = next(_generations)
        self._clear_counts()
        if self._is_open():
            self._opened_at = now
        self._transitions += 1
        event = Transition(self._name, previous, target, reason, failure_count, now)
        self._last_transition = event
        _log.info("breaker.transition", circuit=self._name, previous=previous.value,
                  next=target.value, reason=reason.value, failure_count=failure_count,
                  time=now)
        if self._on_state_change is not None:
            self._on_state_change(event)
