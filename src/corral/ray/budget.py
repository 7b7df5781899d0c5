"""One retry budget for the whole Serve application: a deployment that holds corral's
`RetryBudget` (gRPC's retry throttling, `calls.retry.budget`), and the client through
which each ingress replica asks it before it retries a request on another replica.

Successes are counted where they happen and sent with the next question, so a request
that needs no retry costs no call. A budget that cannot be reached allows the retry:
the attempts (`calls.retry.max_attempts`) still bound it. This module decides nothing
about what to retry.
"""

from __future__ import annotations

from typing import Any, Final, final

import structlog
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from corral.config import RetryBudgetConfig
from corral.resilience.budget import RetryBudget

__all__ = ["BUDGET_DEPLOYMENT", "BudgetClient", "SharedRetryBudget"]

BUDGET_DEPLOYMENT: Final = "corral-retry-budget"
_log = structlog.get_logger("corral.ray")


@final
class SharedRetryBudget:
    """A Serve deployment class (one replica): `serve.deployment(SharedRetryBudget)
    .bind(config.calls.retry.budget)`."""

    def __init__(self, config: RetryBudgetConfig) -> None:
        self._budget = RetryBudget.from_config(config)

    def request_retry(self, successes: int) -> bool:
        """Refill for `successes` calls that ended well since the caller last asked,
        charge one failed attempt, and say whether a retry may follow it."""
        self._budget.record_success(successes)
        return self._budget.request_retry()

    def tokens(self) -> float:
        """The tokens left (a retry is allowed while they exceed half the bucket)."""
        return self._budget.tokens


@final
class BudgetClient:
    """An ingress's side of the shared budget; None for `handle`: every retry allowed
    (`calls.retry.budget.enabled: false`)."""

    def __init__(self, handle: DeploymentHandle[Any] | None) -> None:
        self._handle = handle
        self._successes = 0

    def record_success(self) -> None:
        self._successes += 1

    async def request_retry(self) -> bool:
        """Charge the failed attempt to the shared budget; whether to retry."""
        if self._handle is None:
            return True
        successes, self._successes = self._successes, 0
        try:
            allowed: bool = await self._handle.request_retry.remote(successes)
        except (RayActorError, ActorUnavailableError, RayServeException) as exc:
            _log.warning("ray.retry_budget_unreachable", error=type(exc).__name__)
            return True
        if not allowed:
            _log.warning("ray.retry_budget_exhausted")
        return allowed
