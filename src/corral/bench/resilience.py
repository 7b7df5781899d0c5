"""What resilience costs per call: retry and breaker wrappers against a direct call.

Each variant wraps the same trivial async call (one checkpoint, as any real I/O call has
at least one) on the success path, where the wrappers should cost least. Variants run in
alternating rounds in one process and are reported as ratios to the direct call of the
same run, so machine speed cancels out. The public decorators (`corral.retry`,
`corral.circuit_breaker`) are measured under asyncio too, against a direct call in the
same asyncio loop. `corral bench resilience` also runs the retry storm, so one command
writes both resilience.json and retry_storm.json.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

from corral import resilience
from corral.actors.child_spec import ChildSpec
from corral.actors.ref import ActorRef
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.bench import report, retry_storm
from corral.resilience import retries
from corral.resilience.breaker import CircuitBreaker
from corral.runtime import retry_actor
from corral.runtime.breaker_actor import BreakerActor, call_through

VARIANTS: Final = ("direct", "retry.call", "retries.call with timeout",
                   "retries.call + RetryActor budget", "RetryActor consult (ask)",
                   "CircuitBreaker.call", "BreakerActor call_through", "@retry (trio)",
                   "@circuit_breaker @retry (trio)")
ASYNCIO_VARIANTS: Final = ("asyncio direct", "@retry (asyncio)",
                           "@circuit_breaker (asyncio)", "@circuit_breaker @retry (asyncio)")
"""Measured in one asyncio loop; their ratios are to "asyncio direct"."""

Variants = dict[str, Callable[[], Awaitable[object]]]


async def _operation() -> int:
    await trio.lowlevel.checkpoint()
    return 1


def _decorated(operation: Callable[[], Awaitable[int]], suffix: str) -> Variants:
    """The public decorators around `operation`, as a user writes them."""
    guarded = resilience.circuit_breaker("bench")(operation)
    return {
        f"@retry ({suffix})": resilience.retry()(operation),
        f"@circuit_breaker ({suffix})": guarded,
        f"@circuit_breaker @retry ({suffix})":
            resilience.circuit_breaker("bench")(resilience.retry()(operation)),
    }


def _variants(breaker_ref: ActorRef, retry_ref: ActorRef) -> Variants:
    policy = retries.RetryPolicy()
    budget = retry_actor.ActorBudget(retry_ref)
    breaker = CircuitBreaker("bench")
    decorated = _decorated(_operation, "trio")
    return {
        "@retry (trio)": decorated["@retry (trio)"],
        "@circuit_breaker @retry (trio)": decorated["@circuit_breaker @retry (trio)"],
        "direct": _operation,
        "retry.call": lambda: retries.call(policy, _operation),
        "retries.call with timeout": lambda: retries.call(policy, _operation, timeout=60.0),
        "retries.call + RetryActor budget": lambda: retries.call(policy, _operation, budget=budget),
        "RetryActor consult (ask)": budget.request_retry,
        "CircuitBreaker.call": lambda: breaker.call(_operation),
        "BreakerActor call_through": lambda: call_through(breaker_ref, _operation),
    }


async def _measure(calls: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round, variants interleaved."""
    specs = [ChildSpec(name="breaker", factory=lambda: BreakerActor("bench")),
             ChildSpec(name="retry", factory=retry_actor.RetryActor)]
    async with open_supervisor(Supervisor(specs), name="bench") as tree:
        return await _interleaved(_variants(tree.ref("breaker"), tree.ref("retry")),
                                  VARIANTS, calls, rounds)


async def _asyncio_operation() -> int:
    await asyncio.sleep(0)
    return 1


async def _measure_asyncio(calls: int, rounds: int) -> dict[str, list[float]]:
    """`_measure` for the public decorators under asyncio (its loop, its checkpoint)."""
    variants = {"asyncio direct": _asyncio_operation,
                **_decorated(_asyncio_operation, "asyncio")}
    return await _interleaved(variants, ASYNCIO_VARIANTS, calls, rounds)


async def _interleaved(variants: Variants, names: tuple[str, ...], calls: int,
                       rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round, in trio or asyncio."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    for fn in variants.values():  # warm up: first calls build decoders and caches
        for _ in range(min(calls, 100)):
            await fn()
    for round_ in range(rounds):
        # Alternate the order so no variant always runs right after the same one.
        order = names if round_ % 2 == 0 else tuple(reversed(names))
        for name in order:
            fn = variants[name]
            started = time.perf_counter()
            for _ in range(calls):
                await fn()
            samples[name].append((time.perf_counter() - started) / calls)
    return samples


def main(smoke: bool = False, output_dir: Path | None = None) -> dict[str, Any]:
    """`corral bench resilience`: per-call overhead, then the retry storm.

    Returns:
        {"overhead": what resilience.json holds, "retry_storm": what retry_storm.json holds}.
    """
    calls, rounds = (200, 3) if smoke else (5000, 15)
    samples = {**trio.run(_measure, calls, rounds),
               **asyncio.run(_measure_asyncio(calls, rounds))}
    per_call = {name: statistics.median(found) for name, found in samples.items()}
    rows = []
    for names, direct_name, loop in ((VARIANTS, "direct", "trio"),
                                     (ASYNCIO_VARIANTS, "asyncio direct", "asyncio")):
        direct = per_call[direct_name]
        rows += [{"variant": name, "loop": loop, "us_per_call": per_call[name] * 1e6,
                  "ratio_to_direct": per_call[name] / direct,
                  "overhead_us": (per_call[name] - direct) * 1e6,
                  "spread_us": (max(samples[name]) - min(samples[name])) * 1e6}
                 for name in names]
    # The success path of a retry without a deadline adds no cancel scope: it should
    # cost little beside the call. A deadline adds one cancel scope (trio's own cost).
    # The asyncio rows are reported as ratios only: a first measurement, no target yet.
    goals = [report.goal("retries.call / direct", per_call["retry.call"] / per_call["direct"],
                         "<=", 2.0)]
    parameters = {
        "calls_per_round": calls, "rounds": rounds,
        "operation": "async function with one checkpoint (trio.lowlevel.checkpoint, or "
                     "asyncio.sleep(0) under asyncio), success path",
        "statistic": "median over rounds of seconds per call; ratio to the direct call "
                     "of the same run; variants in alternating order",
        "clock": "wall clock (time.perf_counter)",
    }
    results = {"variants": rows}
    report.write_result("resilience", parameters, results, goals, directory=output_dir, smoke=smoke)
    report.print_table(
        "resilience overhead per call (success path)",
        ["variant", "µs / call", "ratio to direct", "overhead µs", "spread µs"],
        [[row["variant"], row["us_per_call"], row["ratio_to_direct"], row["overhead_us"],
          row["spread_us"]] for row in rows],
        goals)
    overhead = {"parameters": parameters, **results,
                "goals": [msgspec.to_builtins(g) for g in goals]}
    return {"overhead": overhead,
            "retry_storm": retry_storm.main(smoke=smoke, output_dir=output_dir)}
