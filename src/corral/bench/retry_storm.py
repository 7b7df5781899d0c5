"""The retry storm: many clients retrying at once against a target that fails for a while.

It shows what the retry budget is for. Without one, every client retries up to
max_attempts and an outage multiplies the target's load; with one, the callers of the
target share about max_tokens/2 retries plus a fraction of their successes. Everything
runs on trio's clock and the benchmark drives it with MockClock, so its times are
simulated seconds and its numbers are the same on every machine. It never touches a model
or a socket.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal, cast

import msgspec
import trio
import trio.testing

from corral.actors.child_spec import ChildSpec
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.bench import report
from corral.config import RetryBudgetConfig
from corral.protocol.errors import Code, EngineClientError
from corral.resilience.budget import Budget, RetryBudget, RetryCounters
from corral.resilience.retries import JitterMode, RetryPolicy, call
from corral.runtime.retry_actor import ActorBudget, RetryActor

MODES: Final = ("none", "proportional", "full", "equal", "decorrelated")
"""Jitter modes compared; "none" is proportional mode with jitter 0 (a plain backoff)."""

BudgetKind = Literal["none", "local", "actor"]

_STAGGER_S: Final = 1e-5


def storm_policy(mode: str) -> RetryPolicy:
    """The policy of the storm: 100 ms doubling to a 1 s cap, 8 attempts, ±25 %.

    Eight attempts reach past a 2 s outage (100+200+400+800+1000 ms of delays), so
    without a budget every client outlasts the outage.
    """
    jitter_mode = "proportional" if mode == "none" else cast(JitterMode, mode)
    return RetryPolicy(max_attempts=8, initial_delay_ms=100.0, max_delay_ms=1000.0,
                       backoff_multiplier=2.0, jitter=0.0 if mode == "none" else 0.25,
                       jitter_mode=jitter_mode)


class StormResult(msgspec.Struct, frozen=True):
    """What one storm did.

    Attributes:
        mode: the jitter mode ("none" for no jitter).
        budget: "none", "local" (a RetryBudget) or "actor" (a RetryActor's).
        clients: requests made, one per client, all within the first millisecond.
        attempts: attempts the target saw.
        failed: requests that ended with an error.
        successes: requests that succeeded.
        retries_denied: retries the budget refused.
        completion_s: per request, seconds from its start to its end (success or error).
        peak_retries_per_10ms: the most retries (attempts after the first) that reached
            the target within any 10 ms: how synchronised the retries were.
    """

    mode: str
    budget: str
    clients: int
    attempts: int
    failed: int
    successes: int
    retries_denied: int
    completion_s: list[float]
    peak_retries_per_10ms: int


def attempt_bound(clients: int, successes: int, config: RetryBudgetConfig) -> float:
    """The most attempts `clients` requests can make under a retry budget.

    Every granted retry costs a token while tokens stay above max_tokens/2, and only
    successes refill (token_ratio each), so retries <= max_tokens/2 +
    token_ratio·successes, whatever the timing. Each request makes one first attempt.
    """
    return clients + config.max_retry_tokens / 2 + config.token_ratio * successes


class _FlakyTarget:
    """Fails every attempt that arrives before `outage_end` with ECONNRESET."""

    def __init__(self, outage_end: float, service_time_s: float) -> None:
        self.outage_end = outage_end
        self.service_time_s = service_time_s
        self.arrivals = 0

    async def __call__(self) -> None:
        arrived = trio.current_time()
        self.arrivals += 1
        await trio.sleep(self.service_time_s)
        if arrived < self.outage_end:
            raise EngineClientError(Code.TRANSPORT_ERROR, "connection reset by the target")


def _peak(times: Sequence[float], window: float) -> int:
    ordered = sorted(times)
    peak, low = 0, 0
    for high, t in enumerate(ordered):
        while ordered[low] <= t - window:
            low += 1
        peak = max(peak, high - low + 1)
    return peak


async def simulate_storm(mode: str, *, clients: int = 100, outage_s: float = 2.0,
                         budget: BudgetKind = "local", policy: RetryPolicy | None = None,
                         budget_config: RetryBudgetConfig | None = None,
                         service_time_s: float = 0.005, seed: int = 0) -> StormResult:
    """Start `clients` requests at once (10 µs apart) against a target down for `outage_s` s.

    Each request is one `retry.call` with its own seeded random jitter. Run it on a
    MockClock (as the benchmark and the tests do) to get simulated, repeatable times.

    Args:
        mode: a jitter mode, or "none"; picks `storm_policy(mode)` unless `policy` is given.
        budget: no budget, a RetryBudget shared in-process, or a RetryActor's.
        budget_config: the bucket's size and refill; the config's defaults otherwise.
        seed: the jitter of client i is seeded with (seed, i).
    """
    policy = policy or storm_policy(mode)
    config = budget_config or RetryBudgetConfig()
    started = trio.current_time()
    target = _FlakyTarget(started + outage_s, service_time_s)
    completion: list[float] = []
    retries_at: list[float] = []
    failures = 0
    counters = RetryCounters()

    def schedule_retry(attempt: int, delay: float, error: BaseException) -> None:
        retries_at.append(trio.current_time() + delay)

    async def client(index: int, port: RetryBudget | Budget | None) -> None:
        nonlocal failures
        # trio shuffles tasks woken at the same instant; 10 µs apart, the order of
        # events, and so the whole run, is the same every time.
        await trio.sleep(index * _STAGGER_S)
        begun = trio.current_time()
        rng = random.Random(seed * 1_000_003 + index)
        try:
            await call(policy, target, budget=port, rng=rng, stats=counters,
                       on_retry=schedule_retry)
        except EngineClientError:
            failures += 1
        completion.append(trio.current_time() - begun)

    async def run_clients(port: RetryBudget | Budget | None) -> None:
        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(client, index, port)

    if budget == "actor":
        spec = ChildSpec(name="retry", factory=lambda: RetryActor(config))
        async with open_supervisor(Supervisor([spec]), name="storm") as tree:
            await run_clients(ActorBudget(tree.ref("retry")))
    else:
        await run_clients(RetryBudget.from_config(config) if budget == "local" else None)
    return StormResult(mode=mode, budget=budget, clients=clients,
                       attempts=target.arrivals, failed=failures,
                       successes=clients - failures,
                       retries_denied=counters.statistics().retries_denied_by_budget,
                       completion_s=sorted(completion),
                       peak_retries_per_10ms=_peak(retries_at, 0.01))


def _row(result: StormResult, bound: float) -> dict[str, Any]:
    times = result.completion_s
    return {
        "mode": result.mode,
        "budget": result.budget,
        "requests": result.clients,
        "attempts": result.attempts,
        "attempts_per_request": result.attempts / result.clients,
        "attempt_bound": bound if result.budget != "none" else None,
        "failed_requests": result.failed,
        "retries_denied": result.retries_denied,
        "completion_p50_s": report.percentile(times, 50),
        "completion_p99_s": report.percentile(times, 99),
        "completion_max_s": max(times),
        "peak_retries_per_10ms": result.peak_retries_per_10ms,
    }


def run_retry_storm_bench(output_dir: Path | None = None, *, smoke: bool = False,
                          ) -> dict[str, Any]:
    """Run the storm for each jitter mode, with and without the budget; write the JSON.

    Returns:
        The results written to ``retry_storm.json``.
    """
    clients = 20 if smoke else 100
    outage_s = 2.0
    config = RetryBudgetConfig()
    rows = []
    for mode in MODES:
        for kind in ("none", "actor"):
            run = functools.partial(simulate_storm, mode, clients=clients, outage_s=outage_s,
                                    budget=kind, budget_config=config)
            result = trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
            rows.append(_row(result, attempt_bound(clients, result.successes, config)))
    budgeted = [row for row in rows if row["budget"] != "none"]
    worst = max(row["attempts"] - row["attempt_bound"] for row in budgeted)
    goals = [report.goal("attempts over the budget's bound (worst mode)", worst, "<=", 0.0)]
    policy = storm_policy("proportional")
    parameters = {
        "clients": clients, "outage_s": outage_s, "service_time_s": 0.005,
        "clock": "trio.testing.MockClock(autojump_threshold=0): simulated seconds, "
                 "deterministic; not wall-clock time",
        "policy": msgspec.to_builtins(policy), "budget": msgspec.to_builtins(config),
        "bound": "attempts <= requests + max_tokens/2 + token_ratio * successes",
    }
    results = {"runs": rows}
    report.write_result("retry_storm", parameters, results, goals, directory=output_dir,
                        smoke=smoke)
    report.print_table(
        f"retry storm: {clients} clients, {outage_s:g} s outage (simulated time)",
        ["mode", "budget", "attempts", "per request", "failed", "p50 s", "p99 s", "max s",
         "retries peak /10ms"],
        [[row["mode"], row["budget"], row["attempts"], row["attempts_per_request"],
          row["failed_requests"], row["completion_p50_s"], row["completion_p99_s"],
          row["completion_max_s"], row["peak_retries_per_10ms"]] for row in rows],
        goals)
    return {"parameters": parameters, **results, "goals": [msgspec.to_builtins(g) for g in goals]}


def main(smoke: bool = False, output_dir: Path | None = None) -> dict[str, Any]:
    """`corral bench retry-storm`: the storm benchmark; see `run_retry_storm_bench`."""
    return run_retry_storm_bench(output_dir, smoke=smoke)
