"""The retry storm on MockClock: the budget bounds attempts; the benchmarks run in smoke mode."""

from __future__ import annotations

import functools
import json

import pytest
import trio
import trio.testing

from corral.bench import resilience
from corral.bench.retry_storm import (
    MODES,
    StormResult,
    attempt_bound,
    simulate_storm,
    storm_policy,
)
from corral.config import RetryBudgetConfig


@pytest.mark.parametrize("budget", ["local", "actor"])
@pytest.mark.parametrize("mode", MODES)
async def test_with_a_budget_attempts_stay_within_its_bound(autojump_clock, mode, budget):
    config = RetryBudgetConfig()
    result = await simulate_storm(mode, clients=100, outage_s=2.0, budget=budget,
                                  budget_config=config)
    # retries <= max_tokens/2 + token_ratio·successes (see attempt_bound): here 105.
    assert result.attempts <= attempt_bound(100, result.successes, config)
    # A hard outage that outlasts every retry: no success refills the bucket, so only
    # the retries taken above half the bucket happen: tokens 9, 8, 7, 6 of 10.
    assert result.attempts == 100 + 4
    assert result.failed == 100
    assert result.retries_denied == 100 - 4 + 4  # every first failure but 4, every retry


@pytest.mark.parametrize(("outage_s", "max_tokens", "token_ratio"), [
    (0.1, 10.0, 0.1), (0.3, 40.0, 0.5), (0.5, 150.0, 1.0), (1.0, 100.0, 0.2)])
@pytest.mark.parametrize("mode", MODES)
async def test_the_bound_holds_when_successes_refill_the_bucket(autojump_clock, mode, outage_s,
                                                                max_tokens, token_ratio):
    config = RetryBudgetConfig(max_retry_tokens=max_tokens, token_ratio=token_ratio)
    result = await simulate_storm(mode, clients=100, outage_s=outage_s, budget="local",
                                  budget_config=config)
    assert result.attempts <= attempt_bound(100, result.successes, config)


@pytest.mark.parametrize("mode", MODES)
async def test_without_a_budget_an_outage_multiplies_attempts(autojump_clock, mode):
    policy = storm_policy(mode)
    result = await simulate_storm(mode, clients=100, outage_s=600.0, budget="none")
    assert result.attempts == 100 * policy.max_attempts
    assert result.failed == 100
    assert result.retries_denied == 0


async def test_without_a_budget_clients_outlast_a_short_outage(autojump_clock):
    result = await simulate_storm("none", clients=100, outage_s=2.0, budget="none")
    # 100+200+400+800+1000 ms of delays reach past 2 s: the sixth attempt succeeds.
    assert result.attempts == 600
    assert result.failed == 0
    assert result.peak_retries_per_10ms == 100  # no jitter: every retry at once


async def test_jitter_spreads_the_retries(autojump_clock):
    plain = await simulate_storm("none", budget="none")
    jittered = await simulate_storm("proportional", budget="none")
    assert jittered.peak_retries_per_10ms < plain.peak_retries_per_10ms / 2


@pytest.mark.parametrize("budget", ["none", "actor"])
def test_a_storm_is_repeatable(budget):
    def run() -> StormResult:
        storm = functools.partial(simulate_storm, "decorrelated", budget=budget, seed=3)
        return trio.run(storm, clock=trio.testing.MockClock(autojump_threshold=0))

    assert run() == run()


def test_the_resilience_bench_smoke_run_writes_both_results(tmp_path):
    result = resilience.main(smoke=True, output_dir=tmp_path)
    overhead = json.loads((tmp_path / "resilience.json").read_text())
    storm = json.loads((tmp_path / "retry_storm.json").read_text())
    variants = {row["variant"] for row in overhead["results"]["variants"]}
    assert variants == set(resilience.VARIANTS) | set(resilience.ASYNCIO_VARIANTS)
    runs = storm["results"]["runs"]
    assert {(row["mode"], row["budget"]) for row in runs} == {
        (mode, budget) for mode in MODES for budget in ("none", "actor")}
    assert all(row["attempts"] <= row["attempt_bound"] for row in runs
               if row["budget"] != "none")
    assert result["retry_storm"]["runs"] == runs
