"""RetryPolicy, the retry loop, the retry budget and RetryActor, on trio's MockClock."""

from __future__ import annotations

import builtins
import random

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from corral.actors.child_spec import ChildSpec
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.config import RetryBudgetConfig, RetryConfig
from corral.protocol.codec import Decoder, encode
from corral.protocol.errors import (
    Code,
    EngineClientError,
    OverloadedError,
    RetryAbortedError,
    TimeoutError,
)
from corral.resilience import retries
from corral.resilience.budget import ReportOutcome, RetryBudget, RetryCounters, RetryStatistics
from corral.resilience.classify import code_of
from corral.resilience.retries import RetryPolicy
from corral.runtime import retry_actor
from corral.runtime.retry_actor import ActorBudget, RetryActor

EPS = 1e-9


def transport_error() -> EngineClientError:
    return EngineClientError(Code.TRANSPORT_ERROR, "connection reset")


class Flaky:
    """Fails with `errors` in turn (the last one forever), then returns "ok" if told to."""

    def __init__(self, *errors: BaseException, succeed_after: int | None = None,
                 hang_from: int | None = None) -> None:
        self.errors = errors
        self.succeed_after = succeed_after
        self.hang_from = hang_from
        self.times: list[float] = []
        self.raised: list[BaseException] = []

    async def __call__(self) -> str:
        self.times.append(trio.current_time())
        attempt = len(self.times)
        if self.hang_from is not None and attempt >= self.hang_from:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if self.succeed_after is not None and attempt > self.succeed_after:
            return "ok"
        error = self.errors[min(attempt, len(self.errors)) - 1]
        self.raised.append(error)
        raise error


def delays_of(fn: Flaky) -> list[float]:
    return [b - a for a, b in zip(fn.times, fn.times[1:], strict=False)]


# -- the schedule ---------------------------------------------------------------------


async def test_seed_schedule_is_100_200_400_ms_within_25_percent(autojump_clock):
    policy = RetryPolicy.from_config(RetryConfig(max_attempts=4))
    fn = Flaky(transport_error())
    with pytest.raises(EngineClientError):
        await retries.call(policy, fn, rng=random.Random(7))
    assert len(fn.times) == 4
    for slept, base in zip(delays_of(fn), (0.1, 0.2, 0.4), strict=True):
        assert 0.75 * base - EPS <= slept <= 1.25 * base + EPS


@pytest.mark.parametrize("seed", range(20))
async def test_delays_are_capped_at_max_delay(autojump_clock, seed):
    policy = RetryPolicy(max_attempts=15, max_delay_ms=1000.0)
    fn = Flaky(transport_error())
    with pytest.raises(EngineClientError):
        await retries.call(policy, fn, rng=random.Random(seed))
    slept = delays_of(fn)
    assert len(slept) == 14
    assert max(slept) <= 1.0 + EPS
    # At the cap the ±25 % band sits just under it: [1/1.25 · 0.75, 1] s.
    assert all(d >= 0.6 - EPS for d in slept[5:])


def test_default_policy_matches_the_config():
    assert RetryPolicy.from_config(RetryConfig()) == RetryPolicy()


@pytest.mark.parametrize("kwargs", [
    {"max_attempts": 0}, {"initial_delay_ms": -1.0}, {"max_delay_ms": 50.0},
    {"backoff_multiplier": 0.5}, {"jitter": 1.5}, {"jitter_mode": "gaussian"},
    {"retryable_errors": ("EHOSTDOWN",)},
])
def test_a_bad_policy_is_refused(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@given(
    mode=st.sampled_from(["proportional", "full", "equal", "decorrelated"]),
    attempt=st.integers(1, 2000),
    seed=st.integers(0, 2**32 - 1),
    initial_ms=st.floats(0.0, 2000.0),
    extra_ms=st.floats(0.0, 60000.0),
    multiplier=st.floats(1.0, 10.0),
    jitter=st.floats(0.0, 1.0),
    previous=st.floats(0.0, 100.0),
)
def test_each_jitter_mode_stays_in_its_bounds(mode, attempt, seed, initial_ms, extra_ms,
                                              multiplier, jitter, previous):
    policy = RetryPolicy(max_attempts=10, initial_delay_ms=initial_ms,
                         max_delay_ms=initial_ms + extra_ms, backoff_multiplier=multiplier,
                         jitter=jitter, jitter_mode=mode)
    initial, cap = initial_ms / 1000.0, (initial_ms + extra_ms) / 1000.0
    delay = policy.delay(attempt, previous, random.Random(seed))
    try:
        base = min(cap, initial * multiplier ** (attempt - 1))
    except OverflowError:
        base = cap
    tol = 1e-9 * max(1.0, cap)
    assert 0.0 <= delay <= cap + tol
    if mode == "proportional":
        centre = min(base, cap / (1.0 + jitter))
        assert centre * (1 - jitter) - tol <= delay <= centre * (1 + jitter) + tol
    elif mode == "full":
        assert delay <= base + tol
    elif mode == "equal":
        assert base / 2 - tol <= delay <= base + tol
    else:
        assert min(cap, initial) - tol <= delay <= min(cap, 3 * max(previous, initial)) + tol


def test_decorrelated_grows_from_the_previous_delay():
    policy = RetryPolicy(jitter_mode="decorrelated", initial_delay_ms=100.0,
                         max_delay_ms=100000.0)
    rng, previous = random.Random(3), 0.1
    for attempt in range(1, 30):
        delay = policy.delay(attempt, previous, rng)
        assert 0.1 <= delay <= 3 * previous + EPS
        previous = delay


# -- what is retried --------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    EngineClientError(Code.INVALID_PARAMS, "bad max_tokens"),
    OverloadedError("busy", retry_after_ms=10),  # a code the default policy does not list
    ValueError("not a corral error"),
])
async def test_a_non_retryable_error_is_not_retried(autojump_clock, error):
    fn = Flaky(error)
    with pytest.raises(type(error)):
        await retries.call(RetryPolicy(max_attempts=5), fn)
    assert len(fn.times) == 1


async def test_a_client_error_is_never_retried_even_when_listed(autojump_clock):
    policy = RetryPolicy(retryable_errors=("InvalidParams", "TIMEOUT"))
    fn = Flaky(EngineClientError(Code.INVALID_PARAMS, "bad"))
    with pytest.raises(EngineClientError):
        await retries.call(policy, fn)
    assert len(fn.times) == 1
    assert not policy.is_retryable(RetryAbortedError(1))


@pytest.mark.parametrize(("name", "error"), [
    ("TIMEOUT", TimeoutError("generate", 1.0, None, 1.0)),
    ("TIMEOUT", builtins.TimeoutError("socket timed out")),
    ("TIMEOUT", trio.TooSlowError()),
    ("ECONNRESET", transport_error()),
    ("ECONNRESET", ConnectionResetError(104, "Connection reset by peer")),
    ("ECONNRESET", trio.BrokenResourceError()),
    ("Timeout", TimeoutError("generate", 1.0, None, 1.0)),
    ("TRANSPORT_ERROR", ConnectionResetError()),
])
async def test_timeout_and_econnreset_mean_timeout_and_transport_error(autojump_clock, name,
                                                                      error):
    policy = RetryPolicy(max_attempts=3, retryable_errors=(name,))
    fn = Flaky(error)
    with pytest.raises(type(error)):
        await retries.call(policy, fn)
    assert len(fn.times) == 3
    other = "ECONNRESET" if code_of(error) is Code.TIMEOUT else "TIMEOUT"
    assert not RetryPolicy(retryable_errors=(other,)).is_retryable(error)


def test_a_listed_corral_error_keeps_its_own_retryable_flag():
    policy = RetryPolicy(retryable_errors=("TIMEOUT", "GenerationError"))
    assert not policy.is_retryable(EngineClientError(Code.TIMEOUT, "no", retryable=False))
    # GenerationError is retryable "by cause": only when the raising site says so.
    assert policy.is_retryable(EngineClientError(Code.GENERATION_ERROR, "oom", retryable=True))
    assert not policy.is_retryable(EngineClientError(Code.GENERATION_ERROR, "bad grammar"))


async def test_a_retry_after_is_a_floor_for_the_delay(autojump_clock):
    policy = RetryPolicy(max_attempts=2, retryable_errors=("Overloaded",))
    fn = Flaky(OverloadedError("busy", retry_after_ms=700), succeed_after=1)
    assert await retries.call(policy, fn) == "ok"
    assert delays_of(fn) == [pytest.approx(0.7)]


# -- the deadline -----------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0.05, 0.3, 0.5, 1.0, 3.0])
async def test_the_deadline_ends_the_loop_with_the_last_error(autojump_clock, timeout):
    policy = RetryPolicy(max_attempts=100)
    errors = [transport_error() for _ in range(100)]
    fn = Flaky(*errors)
    start = trio.current_time()
    with pytest.raises(EngineClientError) as caught:
        await retries.call(policy, fn, timeout=timeout, rng=random.Random(1))
    assert caught.value is fn.raised[-1]
    ended = trio.current_time()
    # It never sleeps past the deadline: it gives up as soon as the next delay would
    # reach it, so it ends before the deadline and after the last attempt.
    assert ended < start + timeout
    assert ended == fn.times[-1]


async def test_an_absolute_deadline_works_like_a_timeout(autojump_clock):
    fn = Flaky(transport_error())
    deadline = trio.current_time() + 0.25
    with pytest.raises(EngineClientError):
        await retries.call(RetryPolicy(max_attempts=100), fn, deadline=deadline)
    assert trio.current_time() < deadline
    with pytest.raises(ValueError):
        await retries.call(RetryPolicy(), fn, deadline=deadline, timeout=1.0)


async def test_a_first_attempt_past_the_deadline_is_a_timeout(autojump_clock):
    fn = Flaky(hang_from=1)
    start = trio.current_time()
    with pytest.raises(TimeoutError) as caught:
        await retries.call(RetryPolicy(), fn, timeout=2.0)
    assert trio.current_time() == pytest.approx(start + 2.0)
    assert caught.value.timeout == pytest.approx(2.0)
    assert caught.value.duration == pytest.approx(2.0)


async def test_an_attempt_cut_by_the_deadline_ends_with_the_previous_error(autojump_clock):
    fn = Flaky(transport_error(), hang_from=2)
    start = trio.current_time()
    with pytest.raises(EngineClientError) as caught:
        await retries.call(RetryPolicy(max_attempts=5), fn, timeout=1.0)
    assert caught.value is fn.raised[0]
    assert trio.current_time() == pytest.approx(start + 1.0)


# -- cancellation -----------------------------------------------------------------------


async def test_aborting_the_loop_raises_retry_aborted(autojump_clock):
    fn = Flaky(transport_error())
    abort = trio.CancelScope()

    async def abort_later() -> None:
        await trio.sleep(0.25)
        abort.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(abort_later)
        with pytest.raises(RetryAbortedError) as caught:
            await retries.call(RetryPolicy(max_attempts=10), fn, abort=abort, timeout=60.0,
                             rng=random.Random(2))
    assert caught.value.attempts == len(fn.times) == 2
    assert caught.value.last_error is fn.raised[-1]
    assert caught.value.__cause__ is fn.raised[-1]


async def test_an_abort_before_the_call_stops_it_at_its_first_checkpoint(autojump_clock):
    abort = trio.CancelScope()
    abort.cancel()
    fn = Flaky(transport_error())
    with pytest.raises(RetryAbortedError) as caught:
        await retries.call(RetryPolicy(), fn, abort=abort)
    assert caught.value.last_error is None
    assert fn.raised == []


@pytest.mark.parametrize("with_abort", [False, True])
@pytest.mark.parametrize("with_deadline", [False, True])
async def test_an_outer_cancellation_propagates(autojump_clock, with_abort, with_deadline):
    fn = Flaky(transport_error())
    kwargs = {"abort": trio.CancelScope()} if with_abort else {}
    if with_deadline:
        kwargs["timeout"] = 60.0
    with trio.move_on_after(0.25) as outer:
        await retries.call(RetryPolicy(max_attempts=100), fn, rng=random.Random(4), **kwargs)
    assert outer.cancelled_caught
    attempts = len(fn.times)
    await trio.sleep(10)
    assert len(fn.times) == attempts


async def test_an_outer_cancellation_during_an_attempt_propagates(autojump_clock):
    fn = Flaky(hang_from=1)
    with trio.move_on_after(1.0) as outer:
        await retries.call(RetryPolicy(), fn, timeout=5.0, abort=trio.CancelScope())
    assert outer.cancelled_caught


# -- hooks and statistics ---------------------------------------------------------------


async def test_on_retry_gets_attempt_delay_and_error(autojump_clock):
    calls: list[tuple[int, float, BaseException]] = []
    fn = Flaky(transport_error(), transport_error(), succeed_after=2)
    result = await retries.call(RetryPolicy(), fn, rng=random.Random(5),
                              on_retry=lambda *args: calls.append(args))
    assert result == "ok"
    assert [c[0] for c in calls] == [1, 2]
    assert [c[1] for c in calls] == pytest.approx(delays_of(fn))
    assert [c[2] for c in calls] == fn.raised


async def test_statistics_count_attempts_retries_and_delay(autojump_clock):
    stats = RetryCounters()
    policy = RetryPolicy(max_attempts=3)
    rng = random.Random(6)
    first_try = Flaky(succeed_after=0)
    second_try = Flaky(transport_error(), succeed_after=1)
    exhausted = Flaky(transport_error())
    invalid = Flaky(EngineClientError(Code.INVALID_PARAMS, "bad"))
    assert await retries.call(policy, first_try, stats=stats, rng=rng) == "ok"
    assert await retries.call(policy, second_try, stats=stats, rng=rng) == "ok"
    for fn in (exhausted, invalid):
        with pytest.raises(EngineClientError):
            await retries.call(policy, fn, stats=stats, rng=rng)
    slept = sum(delays_of(second_try)) + sum(delays_of(exhausted))
    got = stats.statistics()
    assert got == RetryStatistics(calls=4, attempts=1 + 2 + 3 + 1, successful_retries=1,
                                  failed_retries=1, failed_calls=2,
                                  retries_denied_by_budget=0,
                                  total_delay_s=pytest.approx(slept))


async def test_a_cancelled_call_counts_as_neither_success_nor_failure(autojump_clock):
    stats = RetryCounters()
    with trio.move_on_after(0.15):
        await retries.call(RetryPolicy(), Flaky(transport_error()), stats=stats,
                         rng=random.Random(8))
    got = stats.statistics()
    assert (got.calls, got.attempts, got.failed_calls, got.failed_retries) == (1, 2, 0, 0)


# -- the budget --------------------------------------------------------------------------


def test_budget_bucket_arithmetic():
    bucket = RetryBudget(max_tokens=10.0, token_ratio=0.1)
    assert bucket.tokens == 10.0 and bucket.can_retry()
    # Each failure costs a token; retries stop at half: 9, 8, 7, 6 allowed, 5 not.
    assert [bucket.request_retry() for _ in range(5)] == [True, True, True, True, False]
    assert bucket.tokens == 5.0
    bucket.record_success()
    assert bucket.tokens == pytest.approx(5.1) and bucket.can_retry()
    for _ in range(20):
        bucket.record_failure()
    assert bucket.tokens == 0.0  # never below zero
    for _ in range(50):  # 50 times 0.1 lands exactly on half, with no float drift above it
        bucket.record_success()
    assert bucket.tokens == 5.0 and not bucket.can_retry()
    for _ in range(1000):
        bucket.record_success()
    assert bucket.tokens == 10.0  # never above max


def test_settling_an_outcome():
    bucket = RetryBudget(max_tokens=4.0, token_ratio=0.5)
    bucket.settle(ReportOutcome(success=False, attempts=3, delay_s=0.3, charge_failure=True))
    assert bucket.tokens == 3.0
    bucket.settle(ReportOutcome(success=False, attempts=1, delay_s=0.0))
    bucket.settle(ReportOutcome(success=False, attempts=2, delay_s=0.1, cancelled=True))
    assert bucket.tokens == 3.0
    bucket.settle(ReportOutcome(success=True, attempts=2, delay_s=0.1))
    assert bucket.tokens == 3.5


def test_a_bad_budget_is_refused():
    with pytest.raises(ValueError):
        RetryBudget(max_tokens=0.0)
    with pytest.raises(ValueError):
        RetryBudget(token_ratio=1.5)


async def test_the_budget_denies_retries_and_charges_only_retryable_failures(autojump_clock):
    bucket = RetryBudget(max_tokens=4.0, token_ratio=0.5)
    stats = RetryCounters()
    policy = RetryPolicy(max_attempts=2)
    # A client error costs nothing.
    with pytest.raises(EngineClientError):
        await retries.call(policy, Flaky(EngineClientError(Code.INVALID_PARAMS, "x")),
                         budget=bucket, stats=stats)
    assert bucket.tokens == 4.0
    # One failed attempt that is retried (3 > 2 allowed), one that ran out of attempts.
    with pytest.raises(EngineClientError):
        await retries.call(policy, Flaky(transport_error()), budget=bucket, stats=stats)
    assert bucket.tokens == 2.0
    # Tokens at half: the failure costs its token and the retry is refused.
    fn = Flaky(transport_error())
    with pytest.raises(EngineClientError):
        await retries.call(policy, fn, budget=bucket, stats=stats)
    assert len(fn.times) == 1
    assert bucket.tokens == 1.0
    assert stats.statistics().retries_denied_by_budget == 1
    assert await retries.call(policy, Flaky(succeed_after=0), budget=bucket) == "ok"
    assert bucket.tokens == 1.5


# -- the actor --------------------------------------------------------------------------


def retry_tree(config: RetryBudgetConfig | None = None):
    spec = ChildSpec(name="retry", factory=lambda: RetryActor(config))
    return open_supervisor(Supervisor([spec]), name="t")


async def test_the_actor_grants_from_one_shared_bucket(autojump_clock):
    async with retry_tree(RetryBudgetConfig(max_retry_tokens=4.0, token_ratio=0.5)) as tree:
        budget = ActorBudget(tree.ref("retry"))
        assert [await budget.request_retry() for _ in range(3)] == [True, False, False]
        grant = await tree.ref("retry").ask(retry_actor.RequestRetry())
        assert grant == retry_actor.RetryGrant(False, 0.0)
        stats = await budget.statistics()
        assert stats.retries_denied_by_budget == 3


async def test_calls_through_the_actor_share_its_budget_and_statistics(autojump_clock):
    async with retry_tree(RetryBudgetConfig(max_retry_tokens=4.0, token_ratio=0.5)) as tree:
        budget = ActorBudget(tree.ref("retry"))
        policy = RetryPolicy(max_attempts=5)
        fns = [Flaky(transport_error()) for _ in range(3)]
        for fn in fns:
            with pytest.raises(EngineClientError):
                await retries.call(policy, fn, budget=budget, rng=random.Random(9))
        assert await retries.call(policy, Flaky(succeed_after=0), budget=budget) == "ok"
        # 4 tokens: the first failure (3 left) may retry, its retry (2 left) may not.
        assert [len(fn.times) for fn in fns] == [2, 1, 1]
        stats = await budget.statistics()
        assert (stats.calls, stats.attempts, stats.failed_calls, stats.failed_retries,
                stats.successful_retries, stats.retries_denied_by_budget) == (4, 5, 3, 1, 0, 3)
        # 0 tokens, +0.5 for the success; the next failure's charge floors at 0.
        grant = await tree.ref("retry").ask(retry_actor.RequestRetry())
        assert grant == retry_actor.RetryGrant(False, 0.0)


async def test_an_actor_without_a_budget_always_grants(autojump_clock):
    async with retry_tree(RetryBudgetConfig(enabled=False)) as tree:
        budget = ActorBudget(tree.ref("retry"))
        assert all([await budget.request_retry() for _ in range(50)])
        grant = await tree.ref("retry").ask(retry_actor.RequestRetry())
        assert grant == retry_actor.RetryGrant(True, None)


async def test_without_its_actor_a_target_gets_no_retries(autojump_clock):
    async with retry_tree() as tree:
        budget = ActorBudget(tree.ref("retry"))
        await tree.terminate_child("retry")
        assert not await budget.request_retry()
        budget.report(ReportOutcome(success=True, attempts=1, delay_s=0.0))  # dropped
        fn = Flaky(transport_error())
        with pytest.raises(EngineClientError):
            await retries.call(RetryPolicy(), fn, budget=budget)
        assert len(fn.times) == 1


def test_messages_round_trip_through_the_codec():
    decoder = Decoder(retry_actor.RetryMessage)
    for message in (retry_actor.RequestRetry(), retry_actor.GetRetryStats(),
                    ReportOutcome(success=True, attempts=2, delay_s=0.1)):
        assert decoder.decode(encode(message)) == message
