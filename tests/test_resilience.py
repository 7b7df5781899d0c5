"""The public resilience toolkit: strategies, decorators under trio and asyncio, the
breaker shared by asyncio tasks, fallbacks, one error classification, capped backoff."""

from __future__ import annotations

import asyncio
import builtins
import errno
import random
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import corral
from corral import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    Code,
    EngineClientError,
    Fallback,
    RetryAbortedError,
    RetryBudget,
    RetryPolicy,
    circuit_breaker,
    classify,
    retry,
)
from corral.actors.child_spec import Backoff
from corral.config import CircuitBreakerConfig, RetryConfig, load_config
from corral.resilience.classify import code_of
from corral.resilience.rolling import RollingErrorMetrics

TRANSPORT = ("Timeout", "TransportError")


class Flaky:
    """Fails with `error` the first `failures` calls, then returns the call count."""

    def __init__(self, failures: int, error: Callable[[], Exception] = ConnectionResetError
                 ) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self, *args: Any) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()
        return self.calls

    async def coro(self, *args: Any) -> int:
        await trio.lowlevel.checkpoint() if _in_trio() else await asyncio.sleep(0)
        return self(*args)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


# -- strategies ---------------------------------------------------------------------


def delays(policy: RetryPolicy, count: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    out: list[float] = []
    previous = policy.initial_delay_ms / 1000.0
    for attempt in range(1, count + 1):
        previous = policy.delay(attempt, previous, rng)
        out.append(previous)
    return out


def test_exponential_is_the_seed_schedule_100_200_400_ms_within_25_percent() -> None:
    for seed in range(50):
        first, second, third = delays(RetryPolicy(), 3, seed)
        assert 0.075 <= first <= 0.125
        assert 0.150 <= second <= 0.250
        assert 0.300 <= third <= 0.500


def test_linear_fixed_and_immediate_schedules() -> None:
    plain = {"initial_delay_ms": 100.0, "jitter": 0.0}
    assert delays(RetryPolicy(strategy="linear", **plain), 4) == pytest.approx(
        [0.1, 0.2, 0.3, 0.4])
    assert delays(RetryPolicy(strategy="fixed", **plain), 4) == pytest.approx([0.1] * 4)
    assert delays(RetryPolicy(strategy="immediate", **plain), 4) == [0.0] * 4
    assert delays(RetryPolicy(strategy="exponential", **plain), 4) == pytest.approx(
        [0.1, 0.2, 0.4, 0.8])
    with pytest.raises(ValueError, match="strategy"):
        RetryPolicy(strategy="quadratic")  # type: ignore[arg-type]


@given(strategy=st.sampled_from(["exponential", "linear", "fixed", "immediate"]),
       mode=st.sampled_from(["proportional", "full", "equal", "decorrelated"]),
       initial=st.integers(0, 2000), extra=st.integers(0, 5000),
       jitter=st.floats(0, 1), multiplier=st.floats(1, 10), seed=st.integers(0, 99))
def test_no_strategy_or_jitter_mode_waits_past_max_delay_ms(
        strategy: Any, mode: Any, initial: int, extra: int, jitter: float,
        multiplier: float, seed: int) -> None:
    policy = RetryPolicy(strategy=strategy, jitter_mode=mode, initial_delay_ms=initial,
                         max_delay_ms=initial + extra, jitter=jitter,
                         backoff_multiplier=multiplier)
    for delay in delays(policy, 30, seed):
        assert 0.0 <= delay <= policy.max_delay_ms / 1000.0 + 1e-12


@given(minimum=st.floats(0, 5), extra=st.floats(0, 60), factor=st.floats(0, 1),
       attempt=st.integers(0, 200), seed=st.integers(0, 999))
def test_restart_backoff_never_exceeds_its_max(minimum: float, extra: float, factor: float,
                                               attempt: int, seed: int) -> None:
    backoff = Backoff(min=minimum, max=minimum + extra, random_factor=factor)
    assert 0.0 <= backoff.delay(attempt, random.Random(seed)) <= backoff.max + 1e-12


def test_restart_backoff_of_the_issue_stays_under_30_s() -> None:
    config = load_config(None).restarts
    backoff = Backoff(min=config.delay_base_ms / 1000, max=config.delay_max_ms / 1000,
                      random_factor=0.2)
    rng = random.Random(0)
    assert max(backoff.delay(n, rng) for n in range(5, 40) for _ in range(50)) <= 30.0


# -- config maps 1:1 ------------------------------------------------------------------


def test_retry_config_keys_are_the_policy_fields_with_the_same_defaults() -> None:
    config_fields = {f.name: f.default for f in msgspec.structs.fields(RetryConfig)}
    config_fields.pop("budget")
    policy_fields = {f.name: f.default for f in msgspec.structs.fields(RetryPolicy)}
    assert config_fields == policy_fields
    config = RetryConfig(strategy="linear", max_attempts=7, initial_delay_ms=5,
                         max_delay_ms=50, jitter=0.0, retryable_errors=("Overloaded",))
    policy = RetryPolicy.from_config(config)
    assert (policy.strategy, policy.max_attempts, policy.retryable_codes) == (
        "linear", 7, frozenset({Code.OVERLOADED}))
    retrying = corral.Retrying.from_config(config)
    assert retrying.policy == policy and retrying.budget is not None
    assert retrying.budget.max_tokens == config.budget.max_retry_tokens


def test_breaker_config_keys_are_the_guard_fields() -> None:
    keys = {f.name: f.default for f in msgspec.structs.fields(CircuitBreakerConfig)}
    guard = circuit_breaker("c", **{**keys, "failure_threshold": 2})
    assert guard.breaker.config == CircuitBreakerConfig(failure_threshold=2)
    with pytest.raises(ValueError, match="failure_treshold"):
        circuit_breaker("c", failure_treshold=2)


# -- decorators, sync ---------------------------------------------------------------------


def test_retry_decorates_a_sync_function() -> None:
    flaky = Flaky(2)
    seen: list[tuple[int, float]] = []
    decorated = retry(max_attempts=3, strategy="immediate", retryable_errors=TRANSPORT,
                      on_retry=lambda n, d, e: seen.append((n, d)))(flaky)
    assert decorated() == 3
    assert seen == [(1, 0.0), (2, 0.0)]
    assert retry(max_attempts=2, strategy="immediate").run(Flaky(0)) == 1
    assert decorated.__wrapped__ is flaky  # type: ignore[attr-defined]


def test_sync_retry_gives_up_with_the_last_error_and_never_retries_a_client_error() -> None:
    retrying = retry(max_attempts=3, strategy="immediate", retryable_errors=TRANSPORT)
    with pytest.raises(ConnectionResetError):
        retrying.run(Flaky(5))
    client = Flaky(5, lambda: EngineClientError(Code.INVALID_PARAMS, "bad"))
    with pytest.raises(EngineClientError):
        retrying.run(client)
    assert client.calls == 1
    stats = retrying.statistics()
    assert (stats.calls, stats.attempts, stats.failed_calls) == (2, 4, 2)


def test_sync_retry_abort_from_another_thread_raises_retry_aborted() -> None:
    retrying = retry(max_attempts=5, initial_delay_ms=60_000, max_delay_ms=60_000,
                     retryable_errors=TRANSPORT, abortable=True)
    flaky = Flaky(10)
    timer = threading.Timer(0.05, retrying.abort)
    timer.start()
    with pytest.raises(RetryAbortedError) as caught:
        retrying.run(flaky)
    timer.join()
    assert caught.value.attempts == 1 and flaky.calls == 1
    assert isinstance(caught.value.last_error, ConnectionResetError)


def test_abort_needs_an_abortable_retrying() -> None:
    with pytest.raises(ValueError, match="abortable"):
        retry().abort()


def test_sync_budget_refuses_retries_when_spent() -> None:
    budget = RetryBudget(max_tokens=2.0, token_ratio=0.1)
    retrying = retry(max_attempts=10, strategy="immediate", retryable_errors=TRANSPORT,
                     budget=budget)
    flaky = Flaky(100)
    with pytest.raises(ConnectionResetError):
        retrying.run(flaky)
    assert flaky.calls == 1  # 2 tokens: one failure leaves 1, not above half
    assert retrying.statistics().retries_denied_by_budget == 1


def test_breaker_decorates_a_sync_function_and_opens() -> None:
    now = [0.0]
    breaker = CircuitBreaker("sync", CircuitBreakerConfig(failure_threshold=2,
                                                          recovery_timeout_ms=1000),
                             clock=lambda: now[0])
    flaky = Flaky(2)
    guarded = circuit_breaker(breaker)(flaky)
    for _ in range(2):
        with pytest.raises(ConnectionResetError):
            guarded()
    with pytest.raises(CircuitBreakerOpenError) as caught:
        guarded()
    assert caught.value.retry_after_ms == 1000 and flaky.calls == 2
    now[0] = 1.0
    assert guarded() == 3 and breaker.state is CircuitState.HALF_OPEN


# -- decorators, async under trio ----------------------------------------------------------


async def test_retry_decorates_an_async_function_under_trio(
        autojump_clock: trio.testing.MockClock) -> None:
    flaky = Flaky(2)

    @retry(retryable_errors=TRANSPORT)
    async def fetch(x: int) -> int:
        return await flaky.coro(x)

    started = trio.current_time()
    assert await fetch(1) == 3
    waited = trio.current_time() - started
    assert 0.075 + 0.150 <= waited <= 0.125 + 0.250  # two delays on the seed schedule


async def test_retry_timeout_and_abort_under_trio(
        autojump_clock: trio.testing.MockClock) -> None:
    retrying = retry(max_attempts=10, initial_delay_ms=1000, max_delay_ms=1000,
                     jitter=0.0, retryable_errors=TRANSPORT, timeout=2.5)
    flaky = Flaky(100)
    with pytest.raises(ConnectionResetError):
        await retrying.arun(flaky.coro)
    assert flaky.calls == 3  # t=0, 1 and 2; a retry at 2 + 1 s would pass the deadline
    aborting = retry(max_attempts=10, initial_delay_ms=1000, max_delay_ms=1000,
                     retryable_errors=TRANSPORT, abortable=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_abort_later, aborting, 0.5)
        with pytest.raises(RetryAbortedError):
            await aborting.arun(Flaky(100).coro)


async def _abort_later(retrying: corral.Retrying, delay: float) -> None:
    await trio.sleep(delay)
    retrying.abort()


async def test_breaker_ignores_trio_cancellation(autojump_clock: trio.testing.MockClock
                                                 ) -> None:
    guard = circuit_breaker("t", failure_threshold=1)

    @guard
    async def slow() -> None:
        await trio.sleep(10)

    with trio.move_on_after(1):
        await slow()
    stats = guard.breaker.statistics()
    assert (stats.ignored, stats.failures, stats.state) == (1, 0, CircuitState.CLOSED)


# -- under asyncio ------------------------------------------------------------------------


def run_asyncio(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


def test_decorators_on_async_and_sync_functions_under_asyncio() -> None:
    async def main() -> None:
        flaky = Flaky(2)

        @circuit_breaker("aio", failure_threshold=5)
        @retry(initial_delay_ms=1, max_delay_ms=2, retryable_errors=TRANSPORT)
        async def fetch() -> int:
            return await flaky.coro()

        assert await fetch() == 3
        sync_flaky = Flaky(1)
        assert retry(strategy="immediate", retryable_errors=TRANSPORT)(sync_flaky)() == 2
        timing_out = retry(max_attempts=50, strategy="fixed", initial_delay_ms=5,
                           max_delay_ms=5, jitter=0.0, retryable_errors=TRANSPORT,
                           timeout=0.05)
        many = Flaky(1000)
        with pytest.raises(ConnectionResetError):
            await timing_out.arun(many.coro)
        assert 1 < many.calls < 50

    run_asyncio(main)


def test_retry_abort_and_task_cancel_under_asyncio() -> None:
    async def main() -> None:
        retrying = retry(max_attempts=10, initial_delay_ms=60_000, max_delay_ms=60_000,
                         retryable_errors=TRANSPORT, abortable=True)
        flaky = Flaky(100)
        task = asyncio.ensure_future(retrying.arun(flaky.coro))
        while flaky.calls == 0:
            await asyncio.sleep(0)
        retrying.abort()
        with pytest.raises(RetryAbortedError) as caught:
            await task
        assert caught.value.attempts == 1
        # A cancellation from outside propagates as itself, never retried.
        outer = asyncio.ensure_future(retrying.arun(Flaky(100).coro))
        await asyncio.sleep(0.01)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert retrying.statistics().calls == 2

    run_asyncio(main)


def test_breaker_shared_by_50_asyncio_tasks_admits_exactly_the_half_open_probes() -> None:
    now = [0.0]
    config = CircuitBreakerConfig(failure_threshold=1, recovery_timeout_ms=1000,
                                  half_open_max_calls=3, half_open_success_threshold=3)
    breaker = CircuitBreaker("shared", config, clock=lambda: now[0])
    guard = circuit_breaker(breaker)

    async def main() -> None:
        with pytest.raises(ConnectionResetError):
            await guard.arun(Flaky(1).coro)
        assert breaker.state is CircuitState.OPEN
        now[0] = 1.0
        release = asyncio.Event()
        entered = 0

        async def probe() -> str:
            nonlocal entered
            entered += 1
            await release.wait()
            return "ok"

        tasks = [asyncio.ensure_future(guard.arun(probe)) for _ in range(50)]
        while sum(t.done() for t in tasks) < 47:
            await asyncio.sleep(0)
        assert entered == 3
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results.count("ok") == 3
        assert sum(isinstance(r, CircuitBreakerOpenError) for r in results) == 47
        assert breaker.state is CircuitState.CLOSED

    run_asyncio(main)


def test_breaker_gives_a_cancelled_asyncio_probe_its_slot_back() -> None:
    now = [0.0]
    breaker = CircuitBreaker("c", CircuitBreakerConfig(failure_threshold=1),
                             clock=lambda: now[0])

    async def main() -> None:
        with pytest.raises(ConnectionResetError):
            await breaker.call(Flaky(1).coro)
        now[0] = 100.0
        task = asyncio.ensure_future(breaker.call(asyncio.sleep, 60))
        await asyncio.sleep(0.01)
        assert breaker.statistics().half_open_permits == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = breaker.statistics()
        assert (stats.half_open_permits, stats.state, stats.ignored) == (
            0, CircuitState.HALF_OPEN, 1)
        assert await breaker.call(Flaky(0).coro) == 1  # the next call is served

    run_asyncio(main)


# -- fallbacks ----------------------------------------------------------------------------


async def test_cached_fallback_serves_the_last_good_result_until_its_ttl(
        autojump_clock: trio.testing.MockClock) -> None:
    cache = Fallback.cached(ttl=10.0)
    answers = {"up": True}

    @cache
    async def price(item: str) -> str:
        await trio.lowlevel.checkpoint()
        if not answers["up"]:
            raise httpx.ConnectError("down")
        return f"{item}@{trio.current_time():.0f}"

    assert await price("a") == "a@0"
    answers["up"] = False
    await trio.sleep(5)
    assert await price("a") == "a@0"  # cached, 5 s old
    with pytest.raises(httpx.ConnectError):
        await price("b")  # never succeeded: a miss
    await trio.sleep(5)
    with pytest.raises(httpx.ConnectError):
        await price("a")  # 10 s old: expired
    stats = cache.statistics()
    assert (stats.served, stats.hits, stats.misses, stats.expired, stats.entries) == (
        1, 1, 2, 1, 0)
    answers["up"] = True
    assert await price("a") == "a@10"  # and the next request is served


def test_default_call_and_chain_fallbacks() -> None:
    down = Flaky(100, lambda: builtins.TimeoutError("slow"))
    assert Fallback.default("n/a").run(down) == "n/a"
    backup = Fallback.call(lambda x: f"backup {x}")
    assert backup.run(down, 7) == "backup 7"
    chain = Fallback.chain(Fallback.cached(ttl=60), Fallback.call(Flaky(100)),
                           Fallback.default("default"))
    assert chain.run(lambda: "fresh") == "fresh"
    assert chain.run(down) == "fresh"  # cached for the same (empty) arguments
    assert chain.run(down, 1) == "default"  # no cache for 1; the call fallback failed
    first, second, last = chain.fallbacks
    assert (first.statistics().hits, first.statistics().misses) == (1, 1)
    assert (second.statistics().served, last.statistics().served) == (0, 1)
    assert chain.statistics().served == 2
    with pytest.raises(EngineClientError):  # a client error is never hidden
        Fallback.default("x").run(Flaky(1, lambda: EngineClientError(Code.INVALID_PARAMS,
                                                                      "bad")))


def test_async_call_fallback_under_asyncio() -> None:
    async def backup(x: int) -> int:
        await asyncio.sleep(0)
        return -x

    async def main() -> None:
        fallback = Fallback.chain(Fallback.call(backup))
        assert await fallback.arun(Flaky(1).coro, 5) == -5

    run_asyncio(main)


# -- one classification -----------------------------------------------------------------


ERRORS: list[tuple[BaseException, Code]] = [
    (ConnectionResetError(), Code.TRANSPORT_ERROR),
    (BrokenPipeError(), Code.TRANSPORT_ERROR),
    (ConnectionRefusedError(), Code.TRANSPORT_ERROR),
    (builtins.TimeoutError(), Code.TIMEOUT),
    (trio.TooSlowError(), Code.TIMEOUT),
    (trio.BrokenResourceError(), Code.TRANSPORT_ERROR),
    (httpx.ConnectTimeout("t"), Code.TIMEOUT),
    (httpx.ReadTimeout("t"), Code.TIMEOUT),
    (httpx.WriteTimeout("t"), Code.TIMEOUT),
    (httpx.PoolTimeout("t"), Code.TIMEOUT),
    (httpx.ConnectError("c"), Code.TRANSPORT_ERROR),
    (httpx.ReadError("r"), Code.TRANSPORT_ERROR),
    (httpx.RemoteProtocolError("p"), Code.TRANSPORT_ERROR),
    # What a socket raises when the network, the name or the TLS exchange fails.
    (OSError(errno.EHOSTUNREACH, "No route to host"), Code.TRANSPORT_ERROR),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), Code.TRANSPORT_ERROR),
    (OSError(errno.ENETDOWN, "Network is down"), Code.TRANSPORT_ERROR),
    (OSError(errno.EHOSTDOWN, "Host is down"), Code.TRANSPORT_ERROR),
    (socket.gaierror(socket.EAI_NONAME, "nodename nor servname provided"),
     Code.TRANSPORT_ERROR),
    (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
     Code.TRANSPORT_ERROR),
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
     Code.TRANSPORT_ERROR),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), Code.TRANSPORT_ERROR),
    (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"),
     Code.TRANSPORT_ERROR),
]


def _error_id(value: object) -> str:
    if isinstance(value, OSError) and value.errno is not None:
        return f"{type(value).__name__}-{value.errno}"
    return type(value).__name__


@pytest.mark.parametrize(("error", "code"), ERRORS, ids=_error_id)
def test_classify_agrees_with_retry(error: Exception, code: Code) -> None:
    classification = classify(error)
    assert classification.code is code_of(error) is code
    assert classification.retryable
    assert RetryPolicy(retryable_errors=TRANSPORT).is_retryable(error)
    # The configuration's own aliases name them too.
    assert RetryPolicy().is_retryable(error)
    flaky = Flaky(1, lambda: error)
    assert retry(strategy="immediate").run(flaky) == 2


def test_unknown_errors_stay_unknown_and_are_not_retried() -> None:
    # An OSError that is not the network (a missing file, a bad descriptor) stays unknown.
    assert code_of(FileNotFoundError(errno.ENOENT, "gone")) is Code.UNKNOWN_ERROR
    assert code_of(OSError(errno.EBADF, "bad fd")) is Code.UNKNOWN_ERROR
    assert classify(ValueError()).code is Code.UNKNOWN_ERROR
    assert not classify(ValueError()).retryable
    flaky = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        retry(strategy="immediate").run(flaky)
    assert flaky.calls == 1


# -- rolling error metrics ----------------------------------------------------------------


def test_rolling_metrics_windows_expire_and_percentiles_come_from_the_histograms() -> None:
    now = [0.0]
    rolling = RollingErrorMetrics(clock=lambda: now[0])
    for ms in range(1, 101):  # 1..100 ms
        rolling.record_success("a", ms / 1000)
    rolling.record_error("a", "Timeout")
    rolling.record_retry("a")
    rolling.record_fallback("a", "cached")
    snap = rolling.snapshot()
    one = snap.rates["1m"]
    assert (one.calls, one.successes, one.errors, one.retries) == (101, 100, 1, 1)
    assert one.errors_by_code == {"Timeout": 1} and one.fallbacks == {"cached": 1}
    assert one.error_rate == pytest.approx(1 / 101)
    latency = snap.latency["a"]["1m"]
    assert latency.count == 100
    assert latency.p50_ms == pytest.approx(50, rel=0.02)
    assert latency.p90_ms == pytest.approx(90, rel=0.02)
    assert latency.p99_ms == pytest.approx(99, rel=0.02)
    now[0] = 120.0  # two minutes on: out of the 1-minute window, inside the 5-minute one
    rolling.record_error("b", "Overloaded")
    snap = rolling.snapshot()
    assert (snap.rates["1m"].calls, snap.rates["1m"].errors_by_code) == (1, {"Overloaded": 1})
    assert snap.rates["5m"].calls == 102
    assert snap.rates_by_model["a"]["1m"].calls == 0
    assert snap.latency["a"]["1m"].count == 0 and snap.latency["a"]["5m"].count == 100
    now[0] = 2000.0  # past 15 minutes: everything is gone but the running totals
    snap = rolling.snapshot()
    assert snap.rates["15m"].calls == 0 and snap.latency == {}
    assert rolling.retries_total == {"a": 1}
    assert rolling.fallbacks_total == {("a", "cached"): 1}


def test_breaker_counts_its_time_open() -> None:
    now = [0.0]
    breaker = CircuitBreaker("t", CircuitBreakerConfig(failure_threshold=1,
                                                       recovery_timeout_ms=5000),
                             clock=lambda: now[0])
    permit = breaker.acquire()
    breaker.record(permit, breaker.outcome_of(ConnectionResetError()))
    now[0] = 3.0
    assert breaker.statistics().time_open_s == pytest.approx(3.0)
    now[0] = 10.0  # half-open since 5 s: open for 5 s in all
    assert breaker.statistics().time_open_s == pytest.approx(5.0)
    breaker.force_open()
    now[0] = 12.0
    stats = breaker.statistics()
    assert stats.time_open_s == pytest.approx(7.0) and stats.transitions == 3
