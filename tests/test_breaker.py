"""The circuit breaker: its transition table, permits under concurrency, outcomes, trips
and the actor that shares it. Pure-machine tests drive a fake clock; trio tests run on
pytest-trio's MockClock (autojump), so nothing here depends on the machine's speed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import structlog.testing
import trio
import trio.testing

from corral.actors.child_spec import ChildSpec
from corral.actors.ref import ActorRef
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.config import CircuitBreakerConfig
from corral.protocol.errors import (
    CircuitBreakerOpenError,
    Code,
    EngineClientError,
    RetryAbortedError,
    TimeoutError,
)
from corral.resilience.breaker import CircuitBreaker
from corral.resilience.breaker_types import (
    BreakerStatistics,
    Outcome,
    Permit,
    Reason,
    State,
    Transition,
)
from corral.runtime.breaker_actor import (
    Acquire,
    BreakerActor,
    Disable,
    ForceOpen,
    GetState,
    PermitGranted,
    Record,
    Reset,
    call_through,
)


class FakeClock:
    """A clock for the pure machine: seconds, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Boom(Exception):
    """A failure of the thing behind the breaker."""


def make(clock: FakeClock | None = None, events: list[Transition] | None = None,
         **settings: Any) -> CircuitBreaker:
    return CircuitBreaker("m", CircuitBreakerConfig(**settings),
                          clock=clock if clock is not None else FakeClock(),
                          on_state_change=events.append if events is not None else None)


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record(breaker.acquire(), Outcome.FAILURE)


def succeed(breaker: CircuitBreaker, times: int = 1, duration: float | None = None) -> None:
    for _ in range(times):
        breaker.record(breaker.acquire(), Outcome.SUCCESS, duration)


def moves(events: list[Transition]) -> list[tuple[State, State, Reason]]:
    return [(e.previous, e.next, e.reason) for e in events]


async def boom() -> None:
    raise Boom("backend down")


async def ok() -> str:
    await trio.sleep(0.01)
    return "ok"


# -- the transition table ------------------------------------------------------------

RECOVERY_S = 10.0
TABLE_SETTINGS: dict[str, Any] = dict(
    failure_threshold=1, recovery_timeout_ms=int(RECOVERY_S * 1000), half_open_max_calls=1,
    half_open_success_threshold=1)


def bring_to(state: State, clock: FakeClock) -> tuple[CircuitBreaker, Permit, list[Transition]]:
    """A breaker in `state`, a permit issued in an earlier generation, and its event log."""
    events: list[Transition] = []
    breaker = make(clock, events, **TABLE_SETTINGS)
    stale = breaker.acquire()
    if state is State.CLOSED:
        breaker.force_open()
        breaker.reset()
    elif state is State.OPEN:
        fail(breaker)
    elif state is State.HALF_OPEN:
        fail(breaker)
        clock.advance(RECOVERY_S)
    elif state is State.DISABLED:
        breaker.disable()
    else:
        breaker.force_open()
    assert breaker.state is state
    events.clear()
    return breaker, stale, events


def act(breaker: CircuitBreaker, stale: Permit, clock: FakeClock, action: str) -> None:
    """One stimulus. Outcomes go through a fresh permit when one is granted, else
    through the stale permit (all that a caller could still hold)."""
    if action in ("success", "failure", "ignored"):
        try:
            permit = breaker.acquire()
        except CircuitBreakerOpenError:
            permit = stale
        breaker.record(permit, Outcome(action))
    elif action == "late_success":
        breaker.record(stale, Outcome.SUCCESS)
    elif action == "timeout":
        clock.advance(RECOVERY_S * 3)
    else:
        getattr(breaker, action)()


C, O, H, D, F = State.CLOSED, State.OPEN, State.HALF_OPEN, State.DISABLED, State.FORCED_OPEN
R = Reason

TRANSITIONS: list[tuple[State, str, State, Reason | None]] = [
    # allowed automatic moves
    (C, "failure", O, R.FAILURE_THRESHOLD),
    (O, "timeout", H, R.RECOVERY_TIMEOUT),
    (H, "failure", O, R.PROBE_FAILED),
    (H, "success", C, R.PROBES_SUCCEEDED),
    # forbidden automatic moves: nothing happens
    (C, "success", C, None),
    (C, "ignored", C, None),
    (C, "timeout", C, None),  # never CLOSED -> HALF_OPEN
    (C, "late_success", C, None),
    (O, "success", O, None),  # never OPEN -> CLOSED without probes
    (O, "late_success", O, None),
    (O, "failure", O, None),
    (O, "ignored", O, None),
    (H, "ignored", H, None),
    (H, "timeout", H, None),
    (H, "late_success", H, None),
    (D, "failure", D, None),
    (D, "success", D, None),
    (D, "timeout", D, None),
    (D, "late_success", D, None),
    (F, "success", F, None),
    (F, "failure", F, None),
    (F, "timeout", F, None),  # never FORCED_OPEN -> HALF_OPEN
    (F, "late_success", F, None),
    # operator moves: reset leaves any state for CLOSED; force_open and disable are
    # explicit commands and apply from any state; repeating the current one is no move
    (C, "reset", C, None),
    (O, "reset", C, R.RESET),
    (H, "reset", C, R.RESET),
    (D, "reset", C, R.RESET),
    (F, "reset", C, R.RESET),
    (C, "force_open", F, R.FORCE_OPEN),
    (O, "force_open", F, R.FORCE_OPEN),
    (H, "force_open", F, R.FORCE_OPEN),
    (D, "force_open", F, R.FORCE_OPEN),
    (F, "force_open", F, None),
    (C, "disable", D, R.DISABLE),
    (O, "disable", D, R.DISABLE),
    (H, "disable", D, R.DISABLE),
    (F, "disable", D, R.DISABLE),
    (D, "disable", D, None),
]


@pytest.mark.parametrize(("start", "action", "end", "reason"), TRANSITIONS,
                         ids=[f"{s}-{a}" for s, a, _, _ in TRANSITIONS])
def test_transition_table(start: State, action: str, end: State, reason: Reason | None) -> None:
    clock = FakeClock()
    breaker, stale, events = bring_to(start, clock)
    act(breaker, stale, clock, action)
    assert breaker.state is end
    expected = [] if reason is None else [(start, end, reason)]
    if start is O and action == "timeout":
        assert events[0].time == clock.now - 2 * RECOVERY_S  # when it fell due
    assert moves(events) == expected


@pytest.mark.parametrize("state", [D, F])
def test_disabled_and_forced_open_are_left_only_by_operator(state: State) -> None:
    clock = FakeClock()
    breaker, stale, events = bring_to(state, clock)
    for _ in range(100):
        for action in ("failure", "success", "ignored", "late_success", "timeout"):
            act(breaker, stale, clock, action)
    assert breaker.state is state
    assert events == []
    if state is F:
        with pytest.raises(CircuitBreakerOpenError):
            breaker.acquire()
    else:
        assert breaker.acquire().state is D


def test_every_transition_starts_a_new_generation() -> None:
    clock = FakeClock()
    breaker = make(clock, **TABLE_SETTINGS)
    first = breaker.acquire().generation
    fail(breaker)
    clock.advance(RECOVERY_S)
    probe = breaker.acquire()
    assert probe.generation != first and probe.state is H
    breaker.record(probe, Outcome.SUCCESS)
    assert breaker.acquire().generation not in (first, probe.generation)


# -- counting failures ----------------------------------------------------------------

def test_consecutive_failures_trip_and_a_success_starts_over() -> None:
    events: list[Transition] = []
    breaker = make(events=events, failure_threshold=3)
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker, 2)
    assert breaker.state is C and breaker.statistics().failure_count == 2
    fail(breaker)
    assert breaker.state is O
    assert [(e.reason, e.failure_count) for e in events] == [(R.FAILURE_THRESHOLD, 3)]


def test_failure_window_resets_the_count_after_quiet_time() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=3, failure_window_ms=1000)
    for _ in range(10):
        fail(breaker, 2)
        clock.advance(1.0)  # a full window without failures
        assert breaker.statistics().failure_count == 0
    assert breaker.state is C
    fail(breaker)
    clock.advance(0.999)
    fail(breaker)
    clock.advance(0.999)  # each failure is within the window of the previous one
    fail(breaker)
    assert breaker.state is O


def test_ignored_outcomes_leave_the_count_alone() -> None:
    breaker = make(failure_threshold=2)
    fail(breaker)
    for _ in range(5):
        breaker.release(breaker.acquire())
    assert breaker.statistics().failure_count == 1
    fail(breaker)
    assert breaker.state is O


def test_retry_after_ms_counts_down_to_half_open() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, recovery_timeout_ms=5000)
    fail(breaker)
    tick = 2.0 ** -13  # binary-exact, so the sums below are exact
    for elapsed, left in [(0.0, 5000), (1.25, 3750), (3.5, 250), (0.25 - tick, 1)]:
        clock.advance(elapsed)
        with pytest.raises(CircuitBreakerOpenError) as info:
            breaker.acquire()
        assert (info.value.retry_after_ms, info.value.state, info.value.circuit) == (
            left, "open", "m")
        assert info.value.code is Code.CIRCUIT_OPEN
    clock.advance(tick)
    assert clock.now == 5.0
    assert breaker.acquire().state is H
    assert breaker.statistics().rejected == 4


def test_rejections_in_half_open_and_forced_open_carry_the_recovery_timeout() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, recovery_timeout_ms=5000,
                   half_open_max_calls=1)
    fail(breaker)
    clock.advance(5.0)
    breaker.acquire()
    with pytest.raises(CircuitBreakerOpenError) as info:
        breaker.acquire()
    assert (info.value.retry_after_ms, info.value.state) == (5000, "half_open")
    breaker.force_open()
    with pytest.raises(CircuitBreakerOpenError) as info:
        breaker.acquire()
    assert (info.value.retry_after_ms, info.value.state) == (5000, "forced_open")


def test_half_open_needs_the_success_threshold_and_a_new_timeout_after_a_failed_probe(
) -> None:
    clock = FakeClock()
    events: list[Transition] = []
    breaker = make(clock, events, failure_threshold=1, recovery_timeout_ms=1000,
                   half_open_max_calls=1, half_open_success_threshold=3)
    fail(breaker)
    clock.advance(1.0)
    succeed(breaker, 2)
    assert breaker.state is H
    clock.advance(0.5)
    fail(breaker)
    assert breaker.state is O
    clock.advance(0.999)  # the timeout runs from the failed probe, not the first trip
    assert breaker.state is O
    clock.advance(0.001)
    succeed(breaker, 3)
    assert breaker.state is C
    assert [(e.reason, e.time) for e in events] == [
        (R.FAILURE_THRESHOLD, 0.0), (R.RECOVERY_TIMEOUT, 1.0), (R.PROBE_FAILED, 1.5),
        (R.RECOVERY_TIMEOUT, 2.5), (R.PROBES_SUCCEEDED, 2.5)]


# -- generations: a late result cannot flip a newer state ----------------------------

def test_late_results_from_older_generations_do_not_move_the_state() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, recovery_timeout_ms=1000,
                   half_open_max_calls=2, half_open_success_threshold=1)
    slow_closed = breaker.acquire()
    fail(breaker)  # CLOSED -> OPEN
    breaker.record(slow_closed, Outcome.SUCCESS)  # from CLOSED, lands in OPEN
    assert breaker.state is O
    clock.advance(1.0)
    old_probe, doomed = breaker.acquire(), breaker.acquire()
    breaker.record(doomed, Outcome.FAILURE)  # HALF_OPEN -> OPEN: old_probe is now stale
    clock.advance(1.0)
    assert breaker.state is H
    breaker.record(old_probe, Outcome.SUCCESS)  # must not close the newer HALF_OPEN
    assert breaker.state is H
    assert breaker.statistics().half_open_permits == 0
    probe = breaker.acquire()
    breaker.record(slow_closed, Outcome.FAILURE)  # nor reopen it
    assert breaker.state is H
    breaker.record(probe, Outcome.SUCCESS)
    assert breaker.state is C
    stats = breaker.statistics()
    assert (stats.late, stats.successes, stats.failures) == (3, 3, 3)


def test_a_probe_recorded_twice_counts_once() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, recovery_timeout_ms=1000,
                   half_open_max_calls=2, half_open_success_threshold=2)
    fail(breaker)
    clock.advance(1.0)
    probe = breaker.acquire()
    breaker.record(probe, Outcome.SUCCESS)
    breaker.record(probe, Outcome.SUCCESS)
    assert breaker.state is H
    assert breaker.statistics().late == 1


def test_permits_of_another_breaker_are_late() -> None:
    other = make(failure_threshold=1)
    breaker = make(failure_threshold=1)
    breaker.record(other.acquire(), Outcome.FAILURE)
    assert breaker.state is C and breaker.statistics().late == 1


# -- outcomes -------------------------------------------------------------------------

class _Params(msgspec.Struct):
    n: int


def _validation_error() -> msgspec.ValidationError:
    try:
        msgspec.convert({"n": "x"}, _Params)
    except msgspec.ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("error", "outcome"), [
    (None, Outcome.SUCCESS),
    (Boom(), Outcome.FAILURE),
    (EngineClientError(Code.GENERATION_ERROR, "engine died"), Outcome.FAILURE),
    (EngineClientError(Code.INTERNAL_ERROR, "bug"), Outcome.FAILURE),
    (TimeoutError("generate", 1.0, 7, 1.0), Outcome.FAILURE),
    (EngineClientError(Code.INVALID_REQUEST, "bad envelope"), Outcome.IGNORED),
    (EngineClientError(Code.METHOD_NOT_FOUND, "no such method"), Outcome.IGNORED),
    (EngineClientError(Code.INVALID_PARAMS, "max_tokens < 0"), Outcome.IGNORED),
    (EngineClientError(Code.PARSE_ERROR, "not json"), Outcome.IGNORED),
    (EngineClientError(Code.CANCELLED, "client went away"), Outcome.IGNORED),
    (_validation_error(), Outcome.IGNORED),
    (RetryAbortedError(2, Boom()), Outcome.IGNORED),
    (KeyboardInterrupt(), Outcome.IGNORED),
    (BaseExceptionGroup("g", [KeyboardInterrupt(), EngineClientError(
        Code.INVALID_PARAMS, "x")]), Outcome.IGNORED),
    (ExceptionGroup("g", [EngineClientError(Code.INVALID_PARAMS, "x"), Boom()]),
     Outcome.FAILURE),
], ids=repr)
def test_outcome_of(error: BaseException | None, outcome: Outcome) -> None:
    assert CircuitBreaker.outcome_of(error) is outcome


async def test_outcome_of_trio_cancelled() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            assert CircuitBreaker.outcome_of(exc) is Outcome.IGNORED
            raise


@pytest.mark.parametrize("code", [Code.INVALID_REQUEST, Code.METHOD_NOT_FOUND,
                                  Code.INVALID_PARAMS])
async def test_client_errors_never_open_the_circuit(autojump_clock: Any, code: Code) -> None:
    breaker = CircuitBreaker("m", CircuitBreakerConfig(failure_threshold=1,
                                                       failure_rate_threshold=0.1,
                                                       minimum_calls=1))

    async def refuse() -> None:
        raise EngineClientError(code, "the caller's fault")

    for _ in range(100):
        with pytest.raises(EngineClientError):
            await breaker.call(refuse)
    stats = breaker.statistics()
    assert (stats.state, stats.ignored, stats.transitions) == (C, 100, 0)


async def test_validation_errors_never_open_the_circuit(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("m", CircuitBreakerConfig(failure_threshold=1))

    async def invalid() -> None:
        msgspec.convert({"n": "x"}, _Params)

    for _ in range(100):
        with pytest.raises(msgspec.ValidationError):
            await breaker.call(invalid)
    assert breaker.state is C


async def test_cancellations_never_open_the_circuit(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("m", CircuitBreakerConfig(failure_threshold=1))
    for _ in range(100):
        with trio.move_on_after(0.5):
            await breaker.call(trio.sleep, 10)
    stats = breaker.statistics()
    assert (stats.state, stats.ignored, stats.transitions) == (C, 100, 0)


async def test_client_errors_and_cancellations_neither_close_nor_open_half_open(
        autojump_clock: Any) -> None:
    breaker = CircuitBreaker("m", CircuitBreakerConfig(
        failure_threshold=1, recovery_timeout_ms=1000, half_open_max_calls=1,
        half_open_success_threshold=1))
    with pytest.raises(Boom):
        await breaker.call(boom)
    await trio.sleep(1.0)

    async def refuse() -> None:
        raise EngineClientError(Code.INVALID_PARAMS, "bad")

    for _ in range(100):
        with pytest.raises(EngineClientError):
            await breaker.call(refuse)
        with trio.move_on_after(0.1):
            await breaker.call(trio.sleep, 10)
        assert breaker.statistics().half_open_permits == 0
    assert breaker.state is H
    assert await breaker.call(ok) == "ok"
    assert breaker.state is C


# -- permits under concurrency ----------------------------------------------------------

async def _half_open(half_open_max_calls: int) -> CircuitBreaker:
    breaker = CircuitBreaker("m", CircuitBreakerConfig(
        failure_threshold=1, recovery_timeout_ms=1000, half_open_max_calls=half_open_max_calls,
        half_open_success_threshold=half_open_max_calls))
    with pytest.raises(Boom):
        await breaker.call(boom)
    await trio.sleep(1.0)
    assert breaker.state is H
    return breaker


class Crowd:
    """Many tasks calling through one breaker; a probe holds until released."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.release = trio.Event()
        self.holders: list[trio.CancelScope] = []
        self.rejected = 0
        self.finished = 0
        self.cancelled = 0

    async def _probe(self, scope: trio.CancelScope) -> None:
        self.holders.append(scope)
        await self.release.wait()

    async def caller(self) -> None:
        scope = trio.CancelScope()
        with scope:
            try:
                await self.breaker.call(self._probe, scope)
            except CircuitBreakerOpenError as exc:
                assert exc.state == "half_open"
                self.rejected += 1
                return
            self.finished += 1
        if scope.cancelled_caught:
            self.cancelled += 1


async def test_exactly_half_open_max_calls_permits_for_50_concurrent_tasks(
        autojump_clock: Any) -> None:
    breaker = await _half_open(3)
    crowd = Crowd(breaker)
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(crowd.caller)
        await trio.testing.wait_all_tasks_blocked()
        assert (len(crowd.holders), crowd.rejected) == (3, 47)
        assert breaker.statistics().half_open_permits == 3
        crowd.release.set()
    assert crowd.finished == 3
    assert breaker.state is C


async def test_a_cancelled_probe_gives_back_exactly_one_permit(autojump_clock: Any) -> None:
    breaker = await _half_open(3)
    crowd = Crowd(breaker)
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(crowd.caller)
        await trio.testing.wait_all_tasks_blocked()
        assert (len(crowd.holders), crowd.rejected) == (3, 47)
        crowd.holders[0].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert crowd.cancelled == 1
        assert breaker.statistics().half_open_permits == 2
        for _ in range(50):
            nursery.start_soon(crowd.caller)
        await trio.testing.wait_all_tasks_blocked()
        assert (len(crowd.holders), crowd.rejected) == (4, 96)
        assert breaker.statistics().half_open_permits == 3
        assert breaker.state is H
        crowd.release.set()
    assert crowd.finished == 3
    stats = breaker.statistics()
    assert (stats.state, stats.ignored, stats.half_open_permits) == (C, 1, 0)


async def test_call_is_a_checkpoint_and_a_cancelled_call_takes_no_permit(
        autojump_clock: Any) -> None:
    breaker = await _half_open(1)
    called = False

    async def probe() -> None:
        nonlocal called
        called = True

    with trio.CancelScope() as scope:
        scope.cancel()
        await breaker.call(probe)
    assert not called
    assert breaker.statistics().half_open_permits == 0
    with trio.testing.assert_checkpoints():
        await breaker.call(probe)
    with trio.testing.assert_checkpoints(), pytest.raises(CircuitBreakerOpenError):
        breaker.force_open()
        await breaker.call(probe)


# -- the full cycle and its events ----------------------------------------------------------

async def test_full_cycle_fires_each_event_exactly_once(autojump_clock: Any) -> None:
    events: list[Transition] = []
    breaker = CircuitBreaker("tiny", CircuitBreakerConfig(
        failure_threshold=3, recovery_timeout_ms=5000, half_open_max_calls=1,
        half_open_success_threshold=2), on_state_change=events.append)
    t0 = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(Boom):
                await breaker.call(boom)
        with pytest.raises(CircuitBreakerOpenError):
            await breaker.call(ok)
        await trio.sleep(5.0)
        assert breaker.state is H
        assert breaker.state is H  # reading again fires nothing more
        with pytest.raises(Boom):
            await breaker.call(boom)
        await trio.sleep(4.0)
        assert breaker.state is O
        await trio.sleep(1.0)
        assert await breaker.call(ok) == "ok"
        assert await breaker.call(ok) == "ok"
        assert breaker.state is C
    expected = [
        Transition("tiny", C, O, R.FAILURE_THRESHOLD, 3, t0),
        Transition("tiny", O, H, R.RECOVERY_TIMEOUT, 0, t0 + 5.0),
        Transition("tiny", H, O, R.PROBE_FAILED, 1, t0 + 5.0),
        Transition("tiny", O, H, R.RECOVERY_TIMEOUT, 0, t0 + 10.0),
        Transition("tiny", H, C, R.PROBES_SUCCEEDED, 0, t0 + 10.02),
    ]
    assert len(events) == len(expected)
    for got, want in zip(events, expected, strict=True):
        assert (got.circuit, got.previous, got.next, got.reason, got.failure_count) == (
            want.circuit, want.previous, want.next, want.reason, want.failure_count)
        assert got.time == pytest.approx(want.time)
    transitions = [entry for entry in logs if entry["event"] == "breaker.transition"]
    assert [(e["circuit"], e["previous"], e["next"], e["reason"], e["failure_count"])
            for e in transitions] == [
        (e.circuit, e.previous.value, e.next.value, e.reason.value, e.failure_count)
        for e in events]
    assert all(entry["log_level"] == "info" for entry in transitions)
    stats = breaker.statistics()
    assert (stats.transitions, stats.last_transition) == (5, events[-1])


# -- rate-based and slow-call trips ----------------------------------------------------------

def test_failure_rate_trips_over_a_count_window_after_minimum_calls() -> None:
    events: list[Transition] = []
    breaker = make(events=events, failure_threshold=100, failure_rate_threshold=0.5,
                   minimum_calls=4, sliding_window_size=4)
    fail(breaker)
    succeed(breaker)
    fail(breaker)
    assert breaker.state is C  # 2 of 3: below minimum_calls
    succeed(breaker)  # 2 of 4 = 50%: a success can complete the evidence
    assert breaker.state is O
    assert [(e.reason, e.failure_count) for e in events] == [(R.FAILURE_RATE, 2)]


def test_a_count_window_forgets_its_oldest_calls() -> None:
    breaker = make(failure_threshold=100, failure_rate_threshold=0.5, minimum_calls=4,
                   sliding_window_size=4)
    fail(breaker)
    succeed(breaker, 3)  # 1 of 4
    for _ in range(20):
        fail(breaker)
        succeed(breaker, 2)  # at most 2 of 4 would trip; the window never holds that
        assert breaker.state is C, breaker.statistics()
        succeed(breaker)
    assert breaker.statistics().window_calls == 4


def test_minimum_calls_is_capped_at_a_count_window_size() -> None:
    breaker = make(failure_threshold=100, failure_rate_threshold=1.0, minimum_calls=50,
                   sliding_window_size=3)
    fail(breaker, 3)
    assert breaker.state is O


def test_failure_rate_over_a_time_window() -> None:
    clock = FakeClock()
    events: list[Transition] = []
    breaker = make(clock, events, failure_threshold=100, failure_rate_threshold=0.6,
                   minimum_calls=5, sliding_window_type="time", sliding_window_size=10_000)
    fail(breaker, 3)
    succeed(breaker, 1)
    clock.advance(10.0)  # those four age out
    succeed(breaker, 2)
    fail(breaker, 2)
    assert breaker.state is C
    assert breaker.statistics().window_calls == 4
    fail(breaker)  # 3 of 5 = 60%
    assert breaker.state is O
    assert [(e.reason, e.failure_count) for e in events] == [(R.FAILURE_RATE, 3)]


def test_failure_rate_compares_the_rate_itself() -> None:
    # 3/10 is 0.3, though 0.3 * 10 is a hair above 3 in floating point.
    breaker = make(failure_threshold=100, failure_rate_threshold=0.3, minimum_calls=10,
                   sliding_window_size=10)
    succeed(breaker, 7)
    fail(breaker, 3)
    assert breaker.state is O


def test_slow_calls_trip_the_breaker() -> None:
    events: list[Transition] = []
    breaker = make(events=events, failure_threshold=100, slow_call_duration_ms=500,
                   slow_call_rate_threshold=0.75, minimum_calls=4, sliding_window_size=4)
    succeed(breaker, 1, duration=0.5)  # at the limit counts as slow
    succeed(breaker, 1, duration=0.499)
    breaker.record(breaker.acquire(), Outcome.FAILURE, 0.1)
    succeed(breaker, 1, duration=0.6)
    assert breaker.state is C  # 2 slow of 4
    succeed(breaker, 1, duration=0.5)
    assert breaker.state is C  # the first slow call left the window: 2 of 4 again
    succeed(breaker, 1, duration=0.7)  # 3 slow of 4, with one failure among them
    assert breaker.state is O
    assert [(e.reason, e.failure_count) for e in events] == [(R.SLOW_CALL_RATE, 1)]
    assert breaker.statistics().slow_calls == 4


def test_slow_calls_are_ignored_without_slow_call_duration() -> None:
    breaker = make(failure_threshold=100, minimum_calls=1)
    succeed(breaker, 50, duration=1e9)
    stats = breaker.statistics()
    assert (stats.state, stats.slow_calls, stats.window_calls) == (C, 0, 0)


def test_a_slow_probe_reopens_the_circuit() -> None:
    clock = FakeClock()
    events: list[Transition] = []
    breaker = make(clock, events, failure_threshold=1, recovery_timeout_ms=1000,
                   slow_call_duration_ms=100, half_open_success_threshold=1)
    fail(breaker)
    clock.advance(1.0)
    succeed(breaker, duration=0.2)
    assert breaker.state is O
    assert events[-1].reason is R.PROBE_SLOW
    clock.advance(1.0)
    succeed(breaker, duration=0.05)
    assert breaker.state is C


async def test_call_measures_duration_for_slow_calls(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("m", CircuitBreakerConfig(
        failure_threshold=100, slow_call_duration_ms=1000, minimum_calls=2,
        sliding_window_size=2))
    await breaker.call(trio.sleep, 0.5)
    await breaker.call(trio.sleep, 1.0)
    assert breaker.state is C
    await breaker.call(trio.sleep, 2.0)
    assert breaker.state is O


# -- the function API ------------------------------------------------------------------------

async def test_call_passes_results_and_errors_through(autojump_clock: Any) -> None:
    breaker = CircuitBreaker("m", CircuitBreakerConfig(failure_threshold=2))
    assert await breaker.call(ok) == "ok"

    async def add(a: int, b: int) -> int:
        return a + b

    assert await breaker.call(add, 2, 3) == 5
    with pytest.raises(Boom):
        await breaker.call(boom)
    with pytest.raises(Boom):
        await breaker.call(boom)
    called = False

    async def spy() -> None:
        nonlocal called
        called = True

    with pytest.raises(CircuitBreakerOpenError):
        await breaker.call(spy)
    assert not called
    stats = breaker.statistics()
    assert (stats.successes, stats.failures, stats.rejected) == (2, 2, 1)


def test_statistics_snapshot() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=2, recovery_timeout_ms=1000,
                   half_open_max_calls=2)
    succeed(breaker)
    fail(breaker)
    breaker.release(breaker.acquire())
    stats = breaker.statistics()
    assert stats == BreakerStatistics(
        circuit="m", state=C, failure_count=1, window_calls=0, window_failures=0,
        window_slow_calls=0, successes=1, failures=1, ignored=1, slow_calls=0, late=0,
        rejected=0, half_open_permits=0, transitions=0, last_transition=None)
    fail(breaker)
    clock.advance(1.0)
    breaker.acquire()
    stats = breaker.statistics()
    assert (stats.state, stats.half_open_permits, stats.transitions) == (H, 1, 2)
    assert stats.last_transition == Transition("m", O, H, R.RECOVERY_TIMEOUT, 0, 1.0)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(stats),
                                  type=BreakerStatistics) == stats


def test_reset_clears_the_counts() -> None:
    breaker = make(failure_threshold=3)
    fail(breaker, 2)
    breaker.reset()
    assert breaker.statistics().failure_count == 0
    fail(breaker, 2)
    assert breaker.state is C


# -- the actor ----------------------------------------------------------------------------------

@asynccontextmanager
async def breaker_actor(config: CircuitBreakerConfig,
                        hook: Callable[[Transition], None] | None = None,
                        ) -> AsyncIterator[tuple[ActorRef, Supervisor]]:
    supervisor = Supervisor([ChildSpec(
        name="breaker", factory=lambda: BreakerActor("tiny", config, on_state_change=hook))])
    async with open_supervisor(supervisor) as sup:
        yield sup.ref("breaker"), sup


async def test_actor_acquire_record_and_state(autojump_clock: Any) -> None:
    events: list[Transition] = []
    config = CircuitBreakerConfig(failure_threshold=2, recovery_timeout_ms=1000)
    async with breaker_actor(config, events.append) as (ref, _):
        for _ in range(2):
            granted = await ref.ask(Acquire())
            assert isinstance(granted, PermitGranted) and granted.permit.circuit == "tiny"
            await ref.tell(Record(granted.permit, Outcome.FAILURE, 0.1))
        state = await ref.ask(GetState())
        assert isinstance(state, BreakerStatistics)
        assert (state.state, state.failures) == (O, 2)
        with pytest.raises(CircuitBreakerOpenError) as info:
            await ref.ask(Acquire())
        assert (info.value.retry_after_ms, info.value.state, info.value.circuit) == (
            1000, "open", "tiny")
        assert [e.reason for e in events] == [R.FAILURE_THRESHOLD]


async def test_actor_operator_messages(autojump_clock: Any) -> None:
    async with breaker_actor(CircuitBreakerConfig()) as (ref, _):
        assert (await ref.ask(ForceOpen())).state is F
        with pytest.raises(CircuitBreakerOpenError):
            await ref.ask(Acquire())
        assert (await ref.ask(Disable())).state is D
        assert (await ref.ask(Acquire())).permit.state is D
        assert (await ref.ask(Reset())).state is C
        await ref.tell(ForceOpen())
        assert (await ref.ask(GetState())).state is F


async def test_call_through_records_outcomes(autojump_clock: Any) -> None:
    config = CircuitBreakerConfig(failure_threshold=2, recovery_timeout_ms=1000,
                                  half_open_success_threshold=1)
    async with breaker_actor(config) as (ref, _):
        assert await call_through(ref, ok) == "ok"
        with pytest.raises(EngineClientError):
            await call_through(ref, _raise, EngineClientError(Code.INVALID_PARAMS, "x"))
        for _ in range(2):
            with pytest.raises(Boom):
                await call_through(ref, boom)
        with pytest.raises(CircuitBreakerOpenError):
            await call_through(ref, ok)
        await trio.sleep(1.0)
        assert await call_through(ref, ok) == "ok"
        stats = await ref.ask(GetState())
        assert (stats.state, stats.successes, stats.failures, stats.ignored,
                stats.rejected) == (C, 2, 2, 1, 1)


async def _raise(error: BaseException) -> None:
    raise error


async def test_call_through_gives_back_a_cancelled_probe(autojump_clock: Any) -> None:
    config = CircuitBreakerConfig(failure_threshold=1, recovery_timeout_ms=1000,
                                  half_open_max_calls=1, half_open_success_threshold=1)
    async with breaker_actor(config) as (ref, _):
        with pytest.raises(Boom):
            await call_through(ref, boom)
        await trio.sleep(1.0)
        with trio.move_on_after(5.0):
            await call_through(ref, trio.sleep, 60)
        stats = await ref.ask(GetState())
        assert (stats.state, stats.half_open_permits, stats.ignored) == (H, 0, 1)
        assert await call_through(ref, ok) == "ok"
        assert (await ref.ask(GetState())).state is C


async def test_call_through_gives_back_a_permit_granted_to_a_cancelled_caller(
        autojump_clock: Any) -> None:
    config = CircuitBreakerConfig(failure_threshold=1, recovery_timeout_ms=1000,
                                  half_open_max_calls=1, half_open_success_threshold=1)
    called = False

    async def probe() -> None:
        nonlocal called
        called = True

    async with breaker_actor(config) as (ref, _):
        with pytest.raises(Boom):
            await call_through(ref, boom)
        await trio.sleep(1.0)
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled before the breaker even sees the Acquire
            await call_through(ref, probe)
        assert not called
        stats = await ref.ask(GetState())
        assert (stats.state, stats.half_open_permits, stats.ignored) == (H, 0, 1)
        await call_through(ref, probe)
        assert called and (await ref.ask(GetState())).state is C


async def test_a_crashed_breaker_actor_restarts_closed_and_old_permits_are_late(
        autojump_clock: Any) -> None:
    crashes: list[Transition] = []

    def hook(event: Transition) -> None:
        if not crashes:
            crashes.append(event)
            raise RuntimeError("metrics hook bug")  # not a CorralError: the actor crashes

    async with breaker_actor(CircuitBreakerConfig(failure_threshold=1), hook) as (ref, sup):
        old = (await ref.ask(Acquire())).permit
        with pytest.raises(Boom):
            await call_through(ref, boom)
        await trio.sleep(1.0)  # past the restart backoff
        stats = await ref.ask(GetState())
        assert (stats.state, stats.failures) == (C, 0)
        assert sup.statistics().total_restarts == 1
        await ref.tell(Record(old, Outcome.FAILURE))
        stats = await ref.ask(GetState())
        assert (stats.state, stats.late, stats.transitions) == (C, 1, 0)


def test_messages_round_trip_through_the_codec() -> None:
    permit = Permit("tiny", 7, 3, H, 1.5)
    message = Record(permit, Outcome.IGNORED, None)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(message),
                                     type=BreakerActor.Message)
    assert decoded == message
    assert Acquire.reply_type is PermitGranted and GetState.reply_type is BreakerStatistics
