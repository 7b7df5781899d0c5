"""The circuit breaker against a small reference model, under random interleavings.

Hypothesis drives the pure CircuitBreaker and `Reference` below with the same stream of
acquisitions, results (success, failure, ignored), cancellations (a permit given back),
late and duplicate records, clock moves and operator commands, and checks after every
step that both agree. The clock moves in whole seconds and every configured duration is
a whole number of seconds, so the model's arithmetic is exact and its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from corral.config import CircuitBreakerConfig
from corral.protocol.errors import CircuitBreakerOpenError
from corral.resilience.breaker import CircuitBreaker
from corral.resilience.breaker_types import Outcome, Permit, Reason, State, Transition

Event = tuple[State, State, Reason, int, float]


class Reference:
    """What the breaker should do, written plainly: no windows of time, no rate trip
    over time, no slow calls (the example tests cover those)."""

    def __init__(self, config: CircuitBreakerConfig) -> None:
        self.config = config
        self.recovery = config.recovery_timeout_ms // 1000
        self.failure_window = config.failure_window_ms // 1000
        self.state = State.CLOSED
        self.epoch = 0
        self.opened_at = 0
        self.consecutive = 0
        self.last_failure: int | None = None
        self.outcomes: list[bool] = []  # the count window: True for a failure
        self.probes: set[int] = set()
        self.probe_successes = 0
        self.next_id = 0
        self.events: list[Event] = []
        self.rejected = 0
        self.late = 0

    def failures_now(self, now: int) -> int:
        if self.last_failure is None or now - self.last_failure >= self.failure_window:
            return 0
        return self.consecutive

    def go(self, target: State, reason: Reason, at: int, failure_count: int) -> None:
        self.events.append((self.state, target, reason, failure_count, float(at)))
        self.state = target
        self.epoch += 1
        self.forget()
        if target is State.OPEN:
            self.opened_at = at

    def forget(self) -> None:
        self.consecutive = 0
        self.last_failure = None
        self.outcomes = []
        self.probes = set()
        self.probe_successes = 0

    def tick(self, now: int) -> None:
        if self.state is State.OPEN and now >= self.opened_at + self.recovery:
            self.go(State.HALF_OPEN, Reason.RECOVERY_TIMEOUT, self.opened_at + self.recovery, 0)

    def acquire(self, now: int) -> tuple[int, int] | None:
        """(epoch, id) of the permit granted, or None for a rejection."""
        self.tick(now)
        if self.state in (State.OPEN, State.FORCED_OPEN) or (
                self.state is State.HALF_OPEN
                and len(self.probes) == self.config.half_open_max_calls):
            self.rejected += 1
            return None
        self.next_id += 1
        if self.state is State.HALF_OPEN:
            self.probes.add(self.next_id)
        return self.epoch, self.next_id

    def retry_after_ms(self, now: int) -> int:
        if self.state is State.OPEN:
            return (self.opened_at + self.recovery - now) * 1000
        return self.config.recovery_timeout_ms

    def record(self, now: int, epoch: int, permit_id: int, outcome: Outcome) -> None:
        self.tick(now)
        if epoch != self.epoch:
            self.late += 1
            return
        if self.state is State.HALF_OPEN:
            if permit_id not in self.probes:
                self.late += 1
                return
            self.probes.remove(permit_id)
            if outcome is Outcome.FAILURE:
                self.go(State.OPEN, Reason.PROBE_FAILED, now, 1)
            elif outcome is Outcome.SUCCESS:
                self.probe_successes += 1
                if self.probe_successes == self.config.half_open_success_threshold:
                    self.go(State.CLOSED, Reason.PROBES_SUCCEEDED, now, 0)
            return
        if self.state is not State.CLOSED or outcome is Outcome.IGNORED:
            return
        failed = outcome is Outcome.FAILURE
        if failed:
            self.consecutive = self.failures_now(now) + 1
            self.last_failure = now
            if self.consecutive == self.config.failure_threshold:
                self.go(State.OPEN, Reason.FAILURE_THRESHOLD, now, self.consecutive)
                return
        else:
            self.consecutive = 0
        rate = self.config.failure_rate_threshold
        if rate is None:
            return
        size = self.config.sliding_window_size
        self.outcomes = [*self.outcomes, failed][-size:]
        failures = sum(self.outcomes)
        if (len(self.outcomes) >= min(self.config.minimum_calls, size)
                and failures / len(self.outcomes) >= rate):
            self.go(State.OPEN, Reason.FAILURE_RATE, now, failures)

    def command(self, now: int, target: State, reason: Reason) -> None:
        self.tick(now)
        if self.state is target:
            self.forget()
            return
        count = self.failures_now(now) if self.state is State.CLOSED else 0
        self.go(target, reason, now, count)


configs = st.fixed_dictionaries({
    "failure_threshold": st.integers(1, 6),
    "recovery_timeout_ms": st.sampled_from([1000, 2000, 3000]),
    "half_open_max_calls": st.integers(1, 3),
    "half_open_success_threshold": st.integers(1, 3),
    "failure_window_ms": st.sampled_from([1000, 2000, 5000]),
    "failure_rate_threshold": st.sampled_from([None, 0.3, 0.5, 0.5, 1.0]),
    "minimum_calls": st.integers(1, 6),
    "sliding_window_size": st.integers(1, 6),
}).map(lambda settings: CircuitBreakerConfig(**settings))

# Ignored outcomes weigh less, or trips and closings would hardly ever be reached.
outcomes = st.sampled_from([Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE, Outcome.FAILURE,
                            Outcome.IGNORED])

OperatorCommand = tuple[State, Reason, Callable[[CircuitBreaker], None]]
# Operators act rarely (most draws are None): FORCED_OPEN and DISABLED hold until the
# next command, and runs spent there would test little else.
operator_commands = st.sampled_from([
    None, None, None, None, None, None,
    (State.CLOSED, Reason.RESET, CircuitBreaker.reset),
    (State.FORCED_OPEN, Reason.FORCE_OPEN, CircuitBreaker.force_open),
    (State.DISABLED, Reason.DISABLE, CircuitBreaker.disable),
])

Held = tuple[Permit, int, int]  # the breaker's permit, the model's epoch and id


class BreakerMachine(RuleBasedStateMachine):
    held = Bundle("held")
    spent = Bundle("spent")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.events: list[Transition] = []

    @initialize(config=configs)
    def build(self, config: CircuitBreakerConfig) -> None:
        self.breaker = CircuitBreaker("m", config, clock=lambda: float(self.now),
                                      on_state_change=self.events.append)
        self.model = Reference(config)

    @rule(target=held)
    def acquire(self) -> Any:
        self.model.tick(self.now)
        refused = self.model.state in (State.OPEN, State.FORCED_OPEN)
        expected = self.model.acquire(self.now)
        try:
            permit = self.breaker.acquire()
        except CircuitBreakerOpenError as exc:
            assert expected is None
            assert exc.state == self.model.state.value
            assert exc.retry_after_ms == self.model.retry_after_ms(self.now)
            return multiple()
        assert not refused, "a permit was granted while open"
        assert expected is not None
        assert permit.state is self.model.state
        return (permit, *expected)

    @rule(target=spent, permit=consumes(held), outcome=outcomes)
    def record(self, permit: Held, outcome: Outcome) -> Held:
        self.breaker.record(permit[0], outcome)
        self.model.record(self.now, permit[1], permit[2], outcome)
        return permit

    @rule(target=spent, permit=consumes(held))
    def cancel(self, permit: Held) -> Held:
        self.breaker.release(permit[0])
        self.model.record(self.now, permit[1], permit[2], Outcome.IGNORED)
        return permit

    @rule(permit=spent, outcome=st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE]))
    def record_again(self, permit: Held, outcome: Outcome) -> None:
        self.breaker.record(permit[0], outcome)
        self.model.record(self.now, permit[1], permit[2], outcome)

    @rule(seconds=st.integers(0, 4))
    def advance(self, seconds: int) -> None:
        self.now += seconds

    @rule(results=st.lists(outcomes, min_size=1, max_size=8))
    def calls(self, results: list[Outcome]) -> None:
        """Whole calls one after another: acquire and, if granted, record at once."""
        for outcome in results:
            permit = self.acquire()
            if isinstance(permit, tuple):
                self.record(permit, outcome)

    @rule(command=operator_commands)
    def operator(self, command: OperatorCommand | None) -> None:
        if command is None:
            return
        target, reason, method = command
        method(self.breaker)
        self.model.command(self.now, target, reason)

    @invariant()
    def agree(self) -> None:
        stats = self.breaker.statistics()
        self.model.tick(self.now)
        assert stats.state is self.model.state
        assert stats.failure_count == self.model.failures_now(self.now)
        assert stats.half_open_permits == len(self.model.probes)
        if stats.state is State.HALF_OPEN:
            assert stats.half_open_permits <= self.model.config.half_open_max_calls
        else:
            assert stats.half_open_permits == 0
        assert (stats.rejected, stats.late) == (self.model.rejected, self.model.late)
        assert [(e.previous, e.next, e.reason, e.failure_count, e.time)
                for e in self.events] == self.model.events
        assert stats.transitions == len(self.events)


BreakerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBreakerAgainstModel = BreakerMachine.TestCase
