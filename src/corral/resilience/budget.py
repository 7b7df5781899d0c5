"""The pieces of retry that outlive one call: the retry budget and the statistics.

`RetryBudget` is a token bucket (gRPC's retry throttling) that callers of one target
share so retries cannot multiply load in an outage; `RetryCounters` keeps the totals
behind `RetryStatistics`; `ReportOutcome` is how one call ended, the fact both record.
Pure bookkeeping: no I/O, no clock, no sleeping.
"""

from __future__ import annotations

import threading
from typing import Protocol, final

import msgspec

from corral.config import RetryBudgetConfig

__all__ = ["Budget", "ReportOutcome", "RetryBudget", "RetryCounters", "RetryStatistics"]


class ReportOutcome(msgspec.Struct, frozen=True, tag="retry.report_outcome"):
    """How one `call` ended; a tell to `RetryActor`, and what `RetryCounters` records.

    Attributes:
        success: the call returned a value.
        attempts: attempts made, the first included.
        delay_s: seconds slept between attempts.
        cancelled: the call ended by cancellation (the loop's abort or the caller's).
        charge_failure: the last attempt failed with a retryable error that no
            `RequestRetry` has charged to the budget yet (no retry was asked for: the
            attempts or the deadline ran out); it costs a token now.
    """

    success: bool
    attempts: int
    delay_s: float
    cancelled: bool = False
    charge_failure: bool = False

    @property
    def retried(self) -> bool:
        return self.attempts > 1


@final
class RetryBudget:
    """A token bucket that throttles retries, as gRPC's retry throttling does.

    Tokens start at `max_tokens`. Each attempt that fails with a retryable error costs
    one token (never below zero); each success refills `token_ratio` (never above
    `max_tokens`). A retry is allowed only while tokens > max_tokens / 2. Tokens are
    kept in thousandths, as gRPC does, so the threshold does not drift with floating
    point. Pure bookkeeping: no I/O, no clock; a lock makes each update atomic, so
    tasks of one event loop and threads of `call_sync` alike may share one bucket.

    The bound this gives: every granted retry takes a token while tokens stay above
    half, so over any run, retries granted <= max_tokens/2 + token_ratio·successes.
    """

    __slots__ = ("_half_milli", "_lock", "_max_milli", "_milli", "_ratio_milli")

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        if max_tokens <= 0 or not 0 < token_ratio <= 1:
            raise ValueError("expected max_tokens > 0 and 0 < token_ratio <= 1, got "
                             f"{max_tokens} and {token_ratio}")
        self._max_milli = round(max_tokens * 1000)
        self._half_milli = self._max_milli / 2
        self._ratio_milli = round(token_ratio * 1000)
        self._milli = self._max_milli
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: RetryBudgetConfig) -> RetryBudget:
        return cls(config.max_retry_tokens, config.token_ratio)

    @property
    def tokens(self) -> float:
        return self._milli / 1000.0

    @property
    def max_tokens(self) -> float:
        return self._max_milli / 1000.0

    def can_retry(self) -> bool:
        return self._milli > self._half_milli

    def record_failure(self) -> None:
        with self._lock:
            self._milli = max(0, self._milli - 1000)

    def record_success(self, count: int = 1) -> None:
        """Refill for `count` successes (several at once for a caller that batches
        them, as the Ray ingress does)."""
        with self._lock:
            self._milli = min(self._max_milli, self._milli + self._ratio_milli * count)

    def request_retry(self) -> bool:
        """Charge one failed attempt, then say whether a retry may follow it."""
        with self._lock:
            self._milli = max(0, self._milli - 1000)
            return self._milli > self._half_milli

    def settle(self, outcome: ReportOutcome) -> None:
        """Apply a finished call: a success refills, an uncharged failure costs."""
        if outcome.success:
            self.record_success()
        elif outcome.charge_failure:
            self.record_failure()


class Budget(Protocol):
    """What `call` needs of a shared budget (see `ActorBudget`).

    `request_retry` charges the failed attempt and answers whether to retry;
    `report` records how the call ended. `report` is synchronous because it also runs
    while the call is being cancelled.
    """

    async def request_retry(self) -> bool: ...

    def report(self, outcome: ReportOutcome) -> None: ...


# -- statistics ----------------------------------------------------------------------


class RetryStatistics(msgspec.Struct, frozen=True):
    """Totals over the calls of one target (or of one caller's `RetryCounters`).

    Attributes:
        calls: calls that ended, however.
        attempts: attempts over all those calls, first attempts included.
        successful_retries: calls that succeeded after at least one retry.
        failed_retries: calls that failed after at least one retry.
        failed_calls: calls that failed (cancelled calls count in neither).
        retries_denied_by_budget: retries the budget refused.
        total_delay_s: seconds slept between attempts, over all calls.
    """

    calls: int
    attempts: int
    successful_retries: int
    failed_retries: int
    failed_calls: int
    retries_denied_by_budget: int
    total_delay_s: float


@final
class RetryCounters:
    """Running totals behind `RetryStatistics`; pass one to `call` as `stats`."""

    __slots__ = ("_attempts", "_calls", "_delay_s", "_denied", "_failed_calls",
                 "_failed_retries", "_successful_retries")

    def __init__(self) -> None:
        self._calls = 0
        self._attempts = 0
        self._successful_retries = 0
        self._failed_retries = 0
        self._failed_calls = 0
        self._denied = 0
        self._delay_s = 0.0

    def record(self, outcome: ReportOutcome) -> None:
        self._calls += 1
        self._attempts += outcome.attempts
        self._delay_s += outcome.delay_s
        if outcome.cancelled:
            return
        if outcome.success:
            self._successful_retries += outcome.retried
        else:
            self._failed_calls += 1
            self._failed_retries += outcome.retried

    def record_denied(self) -> None:
        self._denied += 1

    def statistics(self) -> RetryStatistics:
        return RetryStatistics(
            calls=self._calls, attempts=self._attempts,
            successful_retries=self._successful_retries,
            failed_retries=self._failed_retries, failed_calls=self._failed_calls,
            retries_denied_by_budget=self._denied, total_delay_s=self._delay_s)


