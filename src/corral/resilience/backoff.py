"""Delay schedules: the one place that turns an attempt number into a wait.

Retry policies (`corral.resilience.retries.RetryPolicy`, the user's and the runtime's) and
supervisors' restart backoff (`corral.actors.child_spec.Backoff`) both take their delays
from here, so a cap means the same thing everywhere: no delay, jitter included, is ever
longer than it. Pure arithmetic: no clock, no sleeping, no randomness of its own (the
caller passes a uniform draw).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

__all__ = ["STRATEGIES", "Strategy", "base_delay", "spread"]

Strategy = Literal["exponential", "linear", "fixed", "immediate"]
STRATEGIES: Final[frozenset[str]] = frozenset(get_args(Strategy))


def base_delay(strategy: Strategy, attempt: int, initial: float, multiplier: float,
               cap: float) -> float:
    """The delay after failed attempt number `attempt` (1-based), before jitter, capped.

    exponential: initial·multiplier^(attempt-1); linear: initial·attempt; fixed:
    initial every time; immediate: 0. Units are the caller's (seconds or ms alike).
    """
    if strategy == "immediate":
        return 0.0
    if strategy == "fixed":
        return min(cap, initial)
    if strategy == "linear":
        return min(cap, initial * attempt)
    try:
        return min(cap, initial * multiplier ** (attempt - 1))
    except OverflowError:
        return cap


def spread(base: float, cap: float, fraction: float, uniform: float) -> float:
    """`base` spread ± `fraction` by `uniform` (a draw from [0, 1)), never above `cap`.

    The centre is min(base, cap/(1 + fraction)), so the largest spread delay is the cap
    itself and delays at the cap still spread instead of piling up on it; below the cap
    the centre is the base, so 100 ms ± 25 % stays 75..125 ms.
    """
    centre = min(base, cap / (1.0 + fraction))
    return centre * (1.0 + fraction * (2.0 * uniform - 1.0))
