"""Prometheus metrics of one runtime, named after vLLM's.

A `Metrics` owns its own `CollectorRegistry` (never the process-global one), so an
embedding application or a test can run many runtimes side by side. Transports report
each request as it ends (`observe_stream`); supervision events arrive through the
actor system's listener; breaker states, retries and the registry's running and waiting
counts are read from the runtime at scrape time (`render`). Nothing here changes the
runtime or decides anything: it only counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import TYPE_CHECKING, Literal, final

import msgspec
import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.protocol.errors import CorralError
from corral.protocol.lifecycle import LifecycleEvent
from corral.protocol.serving_messages import RegistryState
from corral.resilience.breaker_types import State
from corral.resilience.budget import RetryStatistics
from corral.runtime.choices import ChoiceStreams
from corral.runtime.stream_buffers import StreamBuffer

if TYPE_CHECKING:
    from corral.runtime import Runtime, TokenStream

__all__ = ["Metrics", "RequestOutcome"]

_log = structlog.get_logger("corral.metrics")

RequestOutcome = Literal["success", "error", "cancelled"]

# vLLM's buckets, with finer steps below 10 ms for small, fast models.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_SCRAPE_ASK_TIMEOUT_S = 1.0


class _Snapshot(msgspec.Struct, frozen=True):
    """What `render` asked of the actors just before the scrape; None where one did not
    answer (restarting), so a gauge is left out rather than reported stale."""

    registry: RegistryState | None
    retries: dict[str, RetryStatistics]


@final
class Metrics:
    """The metrics of one runtime. Make one per runtime; `close` when done with it.

    Attributes:
        registry: the CollectorRegistry to expose (`render` does, for GET /metrics).
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.registry = CollectorRegistry()
        registry = self.registry
        self.time_to_first_token = Histogram(
            "corral_time_to_first_token_seconds",
            "Seconds from the request's arrival to its first generated token.",
            ["model"], buckets=_TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "corral_inter_token_latency_seconds",
            "Seconds between two consecutive generated tokens of one request.",
            ["model"], buckets=_ITL_BUCKETS, registry=registry)
        self.e2e_request_latency = Histogram(
            "corral_e2e_request_latency_seconds",
            "Seconds from the request's arrival to its end, however it ended.",
            ["model"], buckets=_E2E_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(
            "corral_prompt_tokens", "Prompt tokens of requests that reached a model.",
            ["model"], registry=registry)
        self.generation_tokens = Counter(
            "corral_generation_tokens", "Tokens generated and delivered to clients.",
            ["model"], registry=registry)
        self.requests = Counter(
            "corral_requests", "Requests ended, by outcome and error code (empty on success).",
            ["outcome", "code"], registry=registry)
        self.actor_restarts = Counter(
            "corral_actor_restarts", "Restarts of supervised actors, by actor path.",
            ["actor"], registry=registry)
        self._collector = _RuntimeCollector(runtime)
        registry.register(self._collector)
        self._unlisten = runtime.add_lifecycle_listener(self._on_lifecycle)

    def close(self) -> None:
        """Stop listening to the runtime's lifecycle events. Idempotent."""
        unlisten, self._unlisten = self._unlisten, lambda: None
        unlisten()

    def _on_lifecycle(self, event: LifecycleEvent) -> None:
        if event.kind == "restarted":
            self.actor_restarts.labels(actor=event.path).inc()

    def observe_stream(self, source: TokenStream | ChoiceStreams | StreamBuffer | None,
                       started_at: float, outcome: RequestOutcome,
                       code: str | None = None) -> None:
        """Record one request as it ends.

        Args:
            source: the request's stream, its choices (the prompt counted once, the
                tokens of each choice) or its buffer; None when it failed before one was
                opened (a bad parameter, Overloaded, an open circuit).
            started_at: `trio.current_time()` when the request arrived.
            outcome: success, error or cancelled (the client went away).
            code: the error code name (`Code`), for error and cancelled outcomes.
        """
        now = trio.current_time()
        self.requests.labels(outcome=outcome, code=code or "").inc()
        if source is None:
            return
        model = source.model
        self.e2e_request_latency.labels(model=model).observe(max(now - started_at, 0.0))
        prompt_tokens = (source.prompt_tokens if isinstance(source, StreamBuffer)
                         else source.usage.prompt_tokens)
        self.prompt_tokens.labels(model=model).inc(prompt_tokens)
        choices = source.streams if isinstance(source, ChoiceStreams) else [source]
        firsts = [stream.token_times[0] for stream in choices if stream.token_times]
        if not firsts:
            return
        self.time_to_first_token.labels(model=model).observe(max(min(firsts) - started_at, 0.0))
        itl = self.inter_token_latency.labels(model=model)
        for stream in choices:
            times = stream.token_times
            self.generation_tokens.labels(model=model).inc(len(times))
            for previous, current in pairwise(times):
                itl.observe(current - previous)

    async def render(self) -> bytes:
        """Ask the actors for what is read at scrape time, then the exposition text.

        An actor that does not answer within a second (restarting, say) leaves its
        metrics out of this scrape; the scrape itself never fails for it.
        """
        runtime = self._runtime
        registry: RegistryState | None = None
        try:
            registry = await runtime.registry_state(timeout=_SCRAPE_ASK_TIMEOUT_S)
        except CorralError as exc:
            _log.info("metrics.registry_unavailable", error=repr(exc))
        retries: dict[str, RetryStatistics] = {}
        for model in runtime.list_models():
            try:
                retries[model.alias] = await runtime.retry_statistics(
                    model.alias, timeout=_SCRAPE_ASK_TIMEOUT_S)
            except CorralError as exc:
                _log.info("metrics.retry_stats_unavailable", model=model.alias,
                          error=repr(exc))
        self._collector.snapshot = _Snapshot(registry, retries)
        return generate_latest(self.registry)


@final
class _RuntimeCollector(Collector):
    """Metrics read from the runtime at scrape time: registry counts, breakers, retries."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.snapshot = _Snapshot(None, {})

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        if snapshot.registry is not None:
            yield GaugeMetricFamily("corral_num_requests_running",
                                    "Requests admitted and generating now.",
                                    value=snapshot.registry.active)
            yield GaugeMetricFamily("corral_num_requests_waiting",
                                    "Requests queued for admission now.",
                                    value=snapshot.registry.queued)
        breaker = GaugeMetricFamily("corral_breaker_state",
                                    "1 for the current state of each model's circuit breaker.",
                                    labels=["model", "state"])
        for model in self._runtime.list_models():
            states = [state.value for state in State]
            if model.breaker not in states:
                states.append(model.breaker)  # the breaker actor is restarting
            for state in states:
                breaker.add_metric([model.alias, state], 1.0 if state == model.breaker else 0.0)
        yield breaker
        yield from _prefix_cache_metrics(self._runtime)
        retries = CounterMetricFamily(
            "corral_retries", "Retries of model calls (attempts beyond the first), per "
            "incarnation of the model's retry actor.", labels=["model"])
        for alias, stats in snapshot.retries.items():
            retries.add_metric([alias], float(stats.attempts - stats.calls))
        yield retries
        transitions = CounterMetricFamily(
            "corral_breaker_transitions", "State changes of each model's circuit breaker "
            "(per incarnation of the breaker actor).", labels=["model"])
        time_open = CounterMetricFamily(
            "corral_breaker_open_seconds", "Seconds each model's circuit breaker has spent "
            "open or forced open (per incarnation of the breaker actor).", labels=["model"])
        for alias, circuit in self._runtime.breaker_statistics().items():
            transitions.add_metric([alias], float(circuit.transitions))
            time_open.add_metric([alias], circuit.time_open_s)
        yield transitions
        yield time_open
        fallbacks = CounterMetricFamily(
            "corral_fallbacks", "Requests served by a fallback, by the model asked for and "
            "what served them (another model's alias, cached or default).",
            labels=["model", "fallback"])
        for alias, served in self._runtime.resilience().fallbacks_total.items():
            for kind, count in served.items():
                fallbacks.add_metric([alias, kind], float(count))
        yield fallbacks


_PREFIX_CACHE_METRICS = (
    ("corral_prefix_cache_queries", CounterMetricFamily, "queries",
     "Prompt tokens looked up in the prefix cache."),
    ("corral_prefix_cache_hits", CounterMetricFamily, "hits",
     "Prompt tokens whose KV came from the prefix cache."),
    ("corral_prefix_cache_bytes", GaugeMetricFamily, "bytes",
     "KV bytes the prefix cache holds in memory."),
    ("corral_prefix_cache_disk_bytes", GaugeMetricFamily, "disk_bytes",
     "Bytes of the prefix cache's files on disk."),
    ("corral_prefix_cache_disk_loads", CounterMetricFamily, "disk_loads",
     "Prefix cache files read back from disk."),
)


def _prefix_cache_metrics(runtime: Runtime) -> Iterator[Metric]:
    """The prefix cache of each model, named as vLLM names its own: the counters sum the
    model's engines since it was loaded, so a worker's restart never sets them back;
    the gauges are what the live engine holds now."""
    by_model = runtime.prefix_cache_statistics()
    for name, family, field, documentation in _PREFIX_CACHE_METRICS:
        metric = family(name, documentation, labels=["model"])
        for alias, stats in by_model.items():
            metric.add_metric([alias], float(getattr(stats, field)))
        yield metric
