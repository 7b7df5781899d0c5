"""The resilience toolkit: retry, circuit breaking, fallbacks and error classification.

What users import for their own calls, under trio and asyncio alike, and what corral's
own serving actors run on: `CircuitBreaker` (breaker), `RetryPolicy` and the retry loop
(retries), `RetryBudget` (budget), delay schedules (backoff), the loop's clock (clock),
`Fallback` (fallbacks), `RollingErrorMetrics` (rolling), `classify` and `code_of`
(classify), and the decorator forms `retry(...)` and `circuit_breaker(...)` (guards).
Nothing here knows of actors, engines or transports: the actors that wrap these live in
`corral.runtime`.
"""

from corral.resilience.breaker import CircuitBreaker as CircuitBreaker
from corral.resilience.breaker_types import BreakerStatistics as BreakerStatistics
from corral.resilience.breaker_types import Outcome as Outcome
from corral.resilience.breaker_types import State as State
from corral.resilience.breaker_types import Transition as Transition
from corral.resilience.budget import RetryBudget as RetryBudget
from corral.resilience.budget import RetryStatistics as RetryStatistics
from corral.resilience.classify import Classification as Classification
from corral.resilience.classify import classify as classify
from corral.resilience.classify import code_of as code_of
from corral.resilience.fallbacks import CachedFallback as CachedFallback
from corral.resilience.fallbacks import CallFallback as CallFallback
from corral.resilience.fallbacks import DefaultFallback as DefaultFallback
from corral.resilience.fallbacks import Fallback as Fallback
from corral.resilience.fallbacks import FallbackChain as FallbackChain
from corral.resilience.fallbacks import FallbackStatistics as FallbackStatistics
from corral.resilience.fallbacks import Recovered as Recovered
from corral.resilience.guards import CircuitBreakerGuard as CircuitBreakerGuard
from corral.resilience.guards import Retrying as Retrying
from corral.resilience.guards import circuit_breaker as circuit_breaker
from corral.resilience.guards import retry as retry
from corral.resilience.retries import RetryPolicy as RetryPolicy
from corral.resilience.rolling import RollingErrorMetrics as RollingErrorMetrics

__all__ = [
    "BreakerStatistics",
    "CachedFallback",
    "CallFallback",
    "CircuitBreaker",
    "CircuitBreakerGuard",
    "Classification",
    "DefaultFallback",
    "Fallback",
    "FallbackChain",
    "FallbackStatistics",
    "Outcome",
    "Recovered",
    "RetryBudget",
    "RetryPolicy",
    "RetryStatistics",
    "Retrying",
    "RollingErrorMetrics",
    "State",
    "Transition",
    "circuit_breaker",
    "classify",
    "code_of",
    "retry",
]
