"""The vocabulary of a circuit breaker: its states, outcomes, permits, transitions and
statistics.

Plain values that a `CircuitBreaker` hands out and the breaker actor carries in its
messages. Data only: no clock, no I/O, no decisions.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import msgspec


class State(enum.StrEnum):
    """Where a breaker is. Only an operator (`disable`, `force_open`, `reset`) enters
    or leaves DISABLED and FORCED_OPEN."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DISABLED = "disabled"
    FORCED_OPEN = "forced_open"


class Outcome(enum.StrEnum):
    """What a guarded call says about the thing behind the breaker.

    Ignored outcomes (client errors, cancellation) count neither way: they only give
    their permit back.
    """

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


class Reason(enum.StrEnum):
    """Why a transition happened."""

    FAILURE_THRESHOLD = "failure_threshold"  # CLOSED -> OPEN: consecutive failures
    FAILURE_RATE = "failure_rate"  # CLOSED -> OPEN: failure rate over the sliding window
    SLOW_CALL_RATE = "slow_call_rate"  # CLOSED -> OPEN: slow-call rate over the window
    RECOVERY_TIMEOUT = "recovery_timeout"  # OPEN -> HALF_OPEN
    PROBE_FAILED = "probe_failed"  # HALF_OPEN -> OPEN
    PROBE_SLOW = "probe_slow"  # HALF_OPEN -> OPEN: a probe succeeded, but slowly
    PROBES_SUCCEEDED = "probes_succeeded"  # HALF_OPEN -> CLOSED
    FORCE_OPEN = "force_open"  # operator: any -> FORCED_OPEN
    DISABLE = "disable"  # operator: any -> DISABLED
    RESET = "reset"  # operator: any -> CLOSED


class Permit(msgspec.Struct, frozen=True):
    """The right to make one call, to be given back through `record` or `release`.

    Attributes:
        circuit: the breaker's name.
        generation: the state period it was issued in; a new one starts at every
            transition, so the result of an old permit never moves a newer state.
        id: unique among the breaker's permits.
        state: the state it was issued in (closed, half_open or disabled).
        issued_at: the breaker's clock when it was issued, in seconds.
    """

    circuit: str
    generation: int
    id: int
    state: State
    issued_at: float


class Transition(msgspec.Struct, frozen=True):
    """One state change, emitted exactly once to structlog and to `on_state_change`.

    Attributes:
        circuit: the breaker's name.
        previous: the state left.
        next: the state entered.
        reason: why.
        failure_count: the failures behind the move: consecutive failures for
            failure_threshold, failures in the sliding window for failure_rate and
            slow_call_rate, 1 for probe_failed; otherwise the consecutive failures
            counted in the state left (0 outside CLOSED).
        time: the breaker's clock when it happened, in seconds. For recovery_timeout
            that is when the timeout ran out, even if the breaker noticed later.
    """

    circuit: str
    previous: State
    next: State
    reason: Reason
    failure_count: int
    time: float


class BreakerStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one breaker (the answer to `GetState` too).

    Attributes:
        circuit: the breaker's name.
        state: the state now (an expired OPEN reads as HALF_OPEN).
        failure_count: consecutive failures counting toward failure_threshold now.
        window_calls: successes and failures in the sliding window now (0 when neither
            rate-based nor slow-call trip is configured).
        window_failures: failures among them.
        window_slow_calls: slow calls among them.
        successes, failures, ignored: outcomes recorded since the breaker was made,
            late ones included.
        slow_calls: recorded calls at or above slow_call_duration_ms.
        late: records whose permit belonged to an older state period (or was already
            given back); counted above, but without effect on the state.
        rejected: acquisitions refused with CircuitBreakerOpenError.
        half_open_permits: probe permits out now.
        transitions: transitions so far.
        last_transition: the latest one, if any.
        time_open_s: seconds spent OPEN or FORCED_OPEN so far, the current spell too.
    """

    circuit: str
    state: State
    failure_count: int
    window_calls: int
    window_failures: int
    window_slow_calls: int
    successes: int
    failures: int
    ignored: int
    slow_calls: int
    late: int
    rejected: int
    half_open_permits: int
    transitions: int
    last_transition: Transition | None
    time_open_s: float = 0.0


StateChangeHook = Callable[[Transition], None]
