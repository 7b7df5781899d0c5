"""The retry actor: owns the retry budget and statistics one target's callers share.

Callers run their retry loops (`corral.resilience.retries.call`) in their own tasks and
consult this actor through `ActorBudget`, so every caller of a target draws on one
budget. Its handlers never await.
"""

from __future__ import annotations

from typing import Any, ClassVar, final

import msgspec
import structlog

from corral.actors.actor import Actor
from corral.actors.ref import ActorRef
from corral.config import RetryBudgetConfig
from corral.protocol.errors import CorralError
from corral.resilience.budget import ReportOutcome, RetryBudget, RetryCounters, RetryStatistics

_log = structlog.get_logger("corral.retry")


class RetryGrant(msgspec.Struct, frozen=True):
    """The answer to `RequestRetry`: whether to retry, and the tokens left (None when
    the target has no budget)."""

    allowed: bool
    tokens: float | None


class RequestRetry(msgspec.Struct, frozen=True, tag="retry.request_retry"):
    """An attempt failed with a retryable error and its caller would retry: charge it
    one token and answer whether it may."""

    reply_type: ClassVar[type[RetryGrant]] = RetryGrant


class GetRetryStats(msgspec.Struct, frozen=True, tag="retry.get_stats"):
    """Ask for the target's `RetryStatistics`."""

    reply_type: ClassVar[type[RetryStatistics]] = RetryStatistics


RetryMessage = RequestRetry | ReportOutcome | GetRetryStats


@final
class RetryActor(Actor[RetryMessage]):
    """Owns the retry budget and the retry statistics of one target (a model alias).

    Callers run their retry loops in their own tasks and consult this actor through
    `ActorBudget`; its mailbox serialises the bucket's updates, so every caller of the
    target draws on one budget. Messages: `RequestRetry` (answered `RetryGrant`),
    `ReportOutcome` (a tell) and `GetRetryStats` (answered `RetryStatistics`). With
    the budget disabled in the config every retry is granted and only the statistics
    are kept. Each incarnation starts with a full bucket and zeroed statistics, as a
    fresh gRPC channel does. Its handlers never await.

    Args:
        config: the bucket's size and refill; the config's defaults when None.
    """

    Message: ClassVar[Any] = RetryMessage

    def __init__(self, config: RetryBudgetConfig | None = None) -> None:
        config = config or RetryBudgetConfig()
        self._budget = RetryBudget.from_config(config) if config.enabled else None
        self._counters = RetryCounters()
        self._throttling = False

    async def handle(self, message: RetryMessage) -> RetryGrant | RetryStatistics | None:
        budget = self._budget
        match message:
            case RequestRetry():
                if budget is None:
                    return RetryGrant(True, None)
                allowed = budget.request_retry()
                if not allowed:
                    self._counters.record_denied()
                self._note_throttling(budget)
                return RetryGrant(allowed, budget.tokens)
            case ReportOutcome():
                self._counters.record(message)
                if budget is not None:
                    budget.settle(message)
                    self._note_throttling(budget)
                return None
            case GetRetryStats():
                return self._counters.statistics()

    def _note_throttling(self, budget: RetryBudget) -> None:
        throttling = not budget.can_retry()
        if throttling != self._throttling:
            self._throttling = throttling
            log = self.ctx.log.warning if throttling else self.ctx.log.info
            log("retry.budget_exhausted" if throttling else "retry.budget_restored",
                tokens=budget.tokens, max_tokens=budget.max_tokens)


@final
class ActorBudget:
    """The `Budget` of a `RetryActor`, for `call(policy, fn, budget=ActorBudget(ref))`.

    If the actor cannot answer (exited, overloaded, or silent for `timeout` seconds)
    the retry is refused: without its budget a target gets no retries, never unbounded
    ones. Reports are sent without waiting and dropped if the actor cannot take them,
    so bookkeeping never delays or fails a call that has ended.
    """

    __slots__ = ("_ref", "_timeout")

    def __init__(self, ref: ActorRef, *, timeout: float = 1.0) -> None:
        self._ref = ref
        self._timeout = timeout

    async def request_retry(self) -> bool:
        try:
            grant: RetryGrant = await self._ref.ask(RequestRetry(), timeout=self._timeout)
        except CorralError as exc:
            _log.warning("retry.budget_unavailable", actor=self._ref.path, error=repr(exc))
            return False
        return grant.allowed

    def report(self, outcome: ReportOutcome) -> None:
        try:
            self._ref.tell_nowait(outcome)
        except CorralError as exc:
            _log.debug("retry.report_dropped", actor=self._ref.path, error=repr(exc))

    async def statistics(self) -> RetryStatistics:
        """The target's statistics, asked of the actor."""
        stats: RetryStatistics = await self._ref.ask(GetRetryStats(), timeout=self._timeout)
        return stats
