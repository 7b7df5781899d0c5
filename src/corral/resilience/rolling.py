"""Rolling error metrics: success and error rates, latency percentiles, retries and
fallbacks over the last 1, 5 and 15 minutes.

Calls are counted in buckets of `bucket_s` seconds on a ring that spans the longest
window; a window's figures sum the buckets it covers, so a figure is exact to within one
bucket at the window's far edge. Latencies go into HdrHistogram buckets (per model and
time bucket, made on first use) and percentiles come from merging those of a window, so
memory stays bounded whatever the traffic. The runtime keeps one (`Runtime.statistics()`,
JSON-RPC `runtime/state`); a user may keep their own for their own calls. Pure
bookkeeping on an injected clock: no I/O, no task, no lock (one event loop's tasks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Final, final

import msgspec
from hdrh.histogram import HdrHistogram

from corral.resilience.clock import current_time

__all__ = ["ErrorRates", "LatencyPercentiles", "RollingErrorMetrics", "RollingSnapshot"]

WINDOWS_S: Final[tuple[int, ...]] = (60, 300, 900)
"""The windows reported, in seconds: 1, 5 and 15 minutes."""

_LOWEST_US: Final = 1
_HIGHEST_US: Final = 3_600_000_000  # an hour: a longer call is recorded as an hour
_DIGITS: Final = 2  # 1 % precision, 24 KiB per histogram


class ErrorRates(msgspec.Struct, frozen=True):
    """What happened in one window.

    Attributes:
        window_s: the window's length in seconds.
        calls: calls that ended in it (cancelled ones excluded).
        successes, errors: how those ended.
        success_rate, error_rate: their shares of `calls` (0.0 when there were none).
        errors_by_code: errors by code name (`Timeout`, ...).
        retries: retries made (attempts after the first).
        fallbacks: calls answered by a fallback, by kind (an alias, "cached", "default").
    """

    window_s: int
    calls: int
    successes: int
    errors: int
    success_rate: float
    error_rate: float
    errors_by_code: dict[str, int]
    retries: int
    fallbacks: dict[str, int]


class LatencyPercentiles(msgspec.Struct, frozen=True):
    """Latency of successful calls in one window, in milliseconds (1 % precision)."""

    window_s: int
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float


class RollingSnapshot(msgspec.Struct, frozen=True):
    """All windows at once: `rates` overall and per model, `latency` per model.

    Keys of the inner dicts are the windows ("1m", "5m", "15m").
    """

    rates: dict[str, ErrorRates]
    rates_by_model: dict[str, dict[str, ErrorRates]]
    latency: dict[str, dict[str, LatencyPercentiles]]


@final
class _Bucket:
    __slots__ = ("errors", "fallbacks", "latency", "retries", "start", "successes")

    def __init__(self, start: int) -> None:
        self.start = start
        self.successes: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.retries: Counter[str] = Counter()
        self.fallbacks: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, HdrHistogram] = {}


def _label(window_s: int) -> str:
    return f"{window_s // 60}m"


@final
class RollingErrorMetrics:
    """Counts of recent calls, by model, in time buckets; see the module docstring.

    Args:
        bucket_s: the bucket width in seconds (the windows' resolution).
        clock: seconds; the running loop's clock by default (MockClock drives it).
    """

    __slots__ = ("_bucket_s", "_buckets", "_clock", "_span", "fallbacks_total",
                 "retries_total")

    def __init__(self, *, bucket_s: int = 10,
                 clock: Callable[[], float] = current_time) -> None:
        if bucket_s < 1 or WINDOWS_S[-1] % bucket_s:
            raise ValueError(f"bucket_s: expected a divisor of {WINDOWS_S[-1]}, got {bucket_s}")
        self._bucket_s = bucket_s
        self._clock = clock
        self._span = WINDOWS_S[-1] // bucket_s
        self._buckets: list[_Bucket | None] = [None] * self._span
        self.retries_total: Counter[str] = Counter()
        """Retries since the start, by model (for counters that never go down)."""
        self.fallbacks_total: Counter[tuple[str, str]] = Counter()
        """Fallbacks since the start, by (requested model, kind)."""

    def _bucket(self) -> _Bucket:
        index = int(self._clock() // self._bucket_s)
        slot = index % self._span
        bucket = self._buckets[slot]
        if bucket is None or bucket.start != index:
            bucket = self._buckets[slot] = _Bucket(index)
        return bucket

    def record_success(self, model: str, latency_s: float) -> None:
        """A call to `model` succeeded after `latency_s` seconds."""
        bucket = self._bucket()
        bucket.successes[model] += 1
        histogram = bucket.latency.get(model)
        if histogram is None:
            histogram = bucket.latency[model] = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
        micros = round(latency_s * 1e6)
        histogram.record_value(min(max(micros, _LOWEST_US), _HIGHEST_US))

    def record_error(self, model: str, code: str) -> None:
        """A call to `model` failed with the error code `code`."""
        self._bucket().errors[model, code] += 1

    def record_retry(self, model: str) -> None:
        self._bucket().retries[model] += 1
        self.retries_total[model] += 1

    def record_fallback(self, model: str, kind: str) -> None:
        """A call to `model` was answered by a fallback: an alias, "cached" or "default"."""
        self._bucket().fallbacks[model, kind] += 1
        self.fallbacks_total[model, kind] += 1

    def snapshot(self) -> RollingSnapshot:
        """Every window, overall and per model."""
        now_index = int(self._clock() // self._bucket_s)
        live = [b for b in self._buckets if b is not None and now_index - b.start < self._span]
        models = sorted({m for b in live for m in (*b.successes, *(k[0] for k in b.errors))})
        rates: dict[str, ErrorRates] = {}
        by_model: dict[str, dict[str, ErrorRates]] = {m: {} for m in models}
        latency: dict[str, dict[str, LatencyPercentiles]] = {m: {} for m in models}
        for window_s in WINDOWS_S:
            label = _label(window_s)
            inside = [b for b in live if now_index - b.start < window_s // self._bucket_s]
            rates[label] = _rates(window_s, inside, None)
            for model in models:
                by_model[model][label] = _rates(window_s, inside, model)
                latency[model][label] = _percentiles(window_s, inside, model)
        return RollingSnapshot(rates, by_model, latency)


def _rates(window_s: int, buckets: list[_Bucket], model: str | None) -> ErrorRates:
    successes = 0
    codes: Counter[str] = Counter()
    retries = 0
    fallbacks: Counter[str] = Counter()
    for bucket in buckets:
        successes += sum(n for m, n in bucket.successes.items() if model in (None, m))
        for (m, code), n in bucket.errors.items():
            if model in (None, m):
                codes[code] += n
        retries += sum(n for m, n in bucket.retries.items() if model in (None, m))
        for (m, kind), n in bucket.fallbacks.items():
            if model in (None, m):
                fallbacks[kind] += n
    errors = sum(codes.values())
    calls = successes + errors
    return ErrorRates(window_s=window_s, calls=calls, successes=successes, errors=errors,
                      success_rate=successes / calls if calls else 0.0,
                      error_rate=errors / calls if calls else 0.0,
                      errors_by_code=dict(codes), retries=retries, fallbacks=dict(fallbacks))


def _percentiles(window_s: int, buckets: list[_Bucket], model: str) -> LatencyPercentiles:
    merged = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
    for bucket in buckets:
        histogram = bucket.latency.get(model)
        if histogram is not None:
            merged.add(histogram)
    count = merged.get_total_count()
    if not count:
        return LatencyPercentiles(window_s, 0, 0.0, 0.0, 0.0)
    p50, p90, p99 = (merged.get_value_at_percentile(p) / 1000.0 for p in (50, 90, 99))
    return LatencyPercentiles(window_s, count, p50, p90, p99)
