"""The runtime configuration's schema: typed, frozen Structs with their defaults.

The Struct defaults are the single source of truth and config/runtime.yaml documents
them key by key (a test keeps the two equal). Ranges are declared on the types;
checks that span keys raise `FieldError` naming the key. Reading files, overlays and
aliases are `corral.config.loading`'s job; this module only declares.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec

from corral.config.environment import builtin_environments
from corral.protocol.errors import resolve_error_name
from corral.protocol.gang import DistributedSettings
from corral.protocol.messages import Alias, Duration
from corral.protocol.validation import FieldError
from corral.protocol.worker import EngineTuning

_PositiveInt: TypeAlias = Annotated[int, msgspec.Meta(ge=1)]
_NonNegativeInt: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]
_Fraction: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Rate: TypeAlias = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
_Name: TypeAlias = Annotated[str, msgspec.Meta(min_length=1)]
_Port: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=65535)]

_API_KEY: Final = re.compile(r"[\x21-\x7e]{16,}")
_ORIGIN: Final = re.compile(r"\*|https?://[^/\s]+")
_LISTEN_URI: Final = re.compile(r"stdio|tcp://(?:\[[^\]\s]+\]|[^/\s:\[\]]+):\d{1,5}|unix://\S+")


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Common options of every config Struct: frozen, keyword-only, no unknown keys."""


class RetryBudgetConfig(Section, frozen=True):
    """A token bucket shared by all callers, as in gRPC retry throttling."""

    enabled: bool = True
    max_retry_tokens: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    """The bucket's size in retry tokens (`RetryBudget`'s `max_tokens`); retries are
    allowed while more than half are left. Not generated tokens."""
    token_ratio: _Rate = 0.1


class RetryConfig(Section, frozen=True):
    """Retry with backoff and jitter: each key but `budget` is a `corral.RetryPolicy` field."""

    max_attempts: _PositiveInt = 3
    strategy: Literal["exponential", "linear", "fixed", "immediate"] = "exponential"
    initial_delay_ms: _NonNegativeInt = 100
    max_delay_ms: _NonNegativeInt = 5000
    backoff_multiplier: Annotated[float, msgspec.Meta(ge=1.0)] = 2.0
    jitter: _Fraction = 0.25
    jitter_mode: Literal["proportional", "full", "equal", "decorrelated"] = "proportional"
    retryable_errors: tuple[_Name, ...] = ("TIMEOUT", "ECONNRESET")
    budget: RetryBudgetConfig = RetryBudgetConfig()

    def __post_init__(self) -> None:
        if self.max_delay_ms < self.initial_delay_ms:
            raise FieldError("max_delay_ms", "expected >= initial_delay_ms")
        for index, name in enumerate(self.retryable_errors):
            try:
                resolve_error_name(name)
            except ValueError as exc:
                raise FieldError(f"retryable_errors[{index}]", str(exc)) from None


class CircuitBreakerConfig(Section, frozen=True):
    """A breaker with a consecutive-failure trip and optional rate and slow-call trips.

    `sliding_window_size` counts calls when `sliding_window_type` is "count" and is a
    duration in ms when it is "time".
    """

    failure_threshold: _PositiveInt = 5
    recovery_timeout_ms: _PositiveInt = 10000
    half_open_max_calls: _PositiveInt = 1
    half_open_success_threshold: _PositiveInt = 2
    failure_window_ms: _PositiveInt = 60000
    failure_rate_threshold: _Rate | None = None
    minimum_calls: _PositiveInt = 10
    sliding_window_type: Literal["count", "time"] = "count"
    sliding_window_size: _PositiveInt = 100
    slow_call_duration_ms: _PositiveInt | None = None
    slow_call_rate_threshold: _Rate = 1.0


class CallsConfig(Section, frozen=True):
    """Every call the runtime makes to a model or an actor, whatever the transport: the
    default deadline of an ask, the retry policy around a model call, the circuit
    breaker of each model. (`json_rpc.default_timeout_ms`, `json_rpc.retry` and
    `json_rpc.circuit_breaker` are aliases, from the format corral started from.)"""

    default_timeout_ms: _PositiveInt = 30000
    retry: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()


class JsonRpcConfig(Section, frozen=True):
    """What one JSON-RPC connection may send and hold."""

    max_line_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1048576
    max_pending_per_connection: _PositiveInt = 64
    max_streams_per_connection: _PositiveInt = 16


class RestartsConfig(Section, frozen=True):
    """How a model's subtree restarts (its engine thread or worker process), and how a
    model that failed for good is reloaded. `max_restarts` also bounds how often one
    stream is resumed. (The `python_runtime.*` keys of the same meaning, `max_restarts`,
    `restart_period_ms`, `restart_delay_base_ms`, `restart_delay_max_ms` and
    `reload_delay_max_ms`, are aliases.)"""

    max_restarts: _NonNegativeInt = 3
    period_ms: _PositiveInt = 60000
    delay_base_ms: _NonNegativeInt = 1000
    delay_max_ms: _NonNegativeInt = 30000
    reload_delay_max_ms: _PositiveInt = 300000

    def __post_init__(self) -> None:
        if self.delay_max_ms < self.delay_base_ms:
            raise FieldError("delay_max_ms", "expected >= delay_base_ms")


class PythonRuntimeConfig(Section, frozen=True):
    """How engine worker processes (process isolation) are started and watched."""

    startup_timeout_ms: _PositiveInt = 60000
    heartbeat_interval_ms: _PositiveInt = 1000
    python_executable: _Name | None = None
    standby_worker: bool = True
    worker_memory_limit_mb: _PositiveInt | None = None  # None: 3/4 of physical memory


class StreamRegistryConfig(Section, frozen=True):
    """Admission, deadlines and idle-reader limits of the stream registry."""

    default_timeout_ms: _PositiveInt = 300000
    max_active_streams: _PositiveInt = EngineTuning().completion_batch_size
    """Streams generating at once; by default the engine's batch (`config_warnings` says
    when the two differ)."""
    max_queued: _NonNegativeInt = 64
    idle_reader_timeout_ms: _PositiveInt = 30000
    overloaded_retry_after_ms: _NonNegativeInt = 1000


class BackoffConfig(Section, frozen=True):
    """Exponential backoff between a supervisor's restarts of one child."""

    min_ms: _NonNegativeInt = 10
    max_ms: _NonNegativeInt = 5000
    random_factor: _Fraction = 0.2
    reset_after_ms: _PositiveInt = 30000

    def __post_init__(self) -> None:
        if self.max_ms < self.min_ms:
            raise FieldError("max_ms", "expected >= min_ms")


class SupervisionConfig(Section, frozen=True):
    """Restart intensity, backoff and mailbox bounds for every supervisor and actor."""

    max_restarts: _NonNegativeInt = 3
    period_ms: _PositiveInt = 5000
    backoff: BackoffConfig = BackoffConfig()
    mailbox_capacity: _PositiveInt = 1024
    stash_limit: _NonNegativeInt = 256
    shutdown_timeout_ms: _PositiveInt = 5000
    fairness_interval: _PositiveInt = 64


class FallbackResponse(Section, frozen=True):
    """A last fallback: the last good completion within `cached_ttl_ms`, or `default`."""

    cached_ttl_ms: _PositiveInt | None = None
    default: str | None = None

    def __post_init__(self) -> None:
        if (self.cached_ttl_ms is None) == (self.default is None):
            raise FieldError("cached_ttl_ms", "expected exactly one of cached_ttl_ms and default")


class ModelConfig(Section, frozen=True):
    """A model loaded at start: its alias (see `corral.protocol.messages.ALIAS_PATTERN`),
    its path, and its fallbacks: other models' aliases, then optionally cached and
    default response steps. `chat_template` replaces the model's own: a Jinja template,
    or the path of a file holding one. `adapter_path`: a LoRA adapter directory
    (`adapter_config.json` and `adapters.safetensors`, as mlx_lm's tuner writes them),
    applied at load (`mlx_lm.load(path, adapter_path=...)`)."""

    alias: Alias
    path: _Name
    fallbacks: tuple[Alias | FallbackResponse, ...] = ()
    chat_template: _Name | None = None
    adapter_path: _Name | None = None
    distributed: DistributedSettings | None = None
    """Serve it from several processes, each holding a shard (mlx.distributed, tensor
    parallel), supervised as one gang: see `corral.protocol.gang.DistributedSettings`.
    Always worker processes, whatever `generation.isolation` says."""
    keep_alive: float | Duration | None = None
    """How long the model stays loaded while idle, as Ollama's `keep_alive`: seconds or
    a duration ("5m", "1h"); 0 unloads it after each request, a negative value or null
    keeps it loaded for good. Unloaded, it loads again on its next request
    (`corral.runtime.keep_alive`)."""

    @property
    def fallback_aliases(self) -> tuple[str, ...]:
        return tuple(step for step in self.fallbacks if isinstance(step, str))

    @property
    def fallback_responses(self) -> tuple[FallbackResponse, ...]:
        return tuple(step for step in self.fallbacks if isinstance(step, FallbackResponse))


class GenerationConfig(Section, EngineTuning, frozen=True):
    """The generation domain: engine isolation, models, and request limits, then the
    engine's batching, pacing and caching keys, inherited from `EngineTuning` (declared
    with the worker protocol, which carries them to the engine as they are)."""

    isolation: Literal["thread", "process"] = "thread"
    cpu_blas: Literal["auto", "reference"] = "auto"
    models: tuple[ModelConfig, ...] = ()
    default_max_tokens: _PositiveInt | None = 256
    max_tokens_limit: _PositiveInt | None = None
    max_prompt_tokens: _PositiveInt | None = None
    stall_timeout_ms: _PositiveInt = 30000

    def __post_init__(self) -> None:
        if (self.max_tokens_limit is not None and self.default_max_tokens is not None
                and self.default_max_tokens > self.max_tokens_limit):
            raise FieldError("default_max_tokens", "expected <= max_tokens_limit")
        aliases: set[str] = set()
        for index, model in enumerate(self.models):
            if model.alias in aliases:
                raise FieldError(f"models[{index}].alias", f"duplicate alias {model.alias!r}")
            aliases.add(model.alias)
        for index, model in enumerate(self.models):
            for position, fallback in enumerate(model.fallbacks):
                if not isinstance(fallback, str):
                    continue
                if position >= len(model.fallback_aliases):
                    raise FieldError(f"models[{index}].fallbacks[{position}]",
                                      "expected model aliases before cached and default steps")
                if fallback == model.alias or fallback not in aliases:
                    raise FieldError(
                        f"models[{index}].fallbacks[{position}]",
                        f"expected the alias of another configured model, got {fallback!r}",
                    )
        _load_order(self.models)  # a cycle raises FieldError

    @property
    def models_in_load_order(self) -> tuple[ModelConfig, ...]:
        """`models` in an order that loads each model's fallbacks before it (a model
        can fall back only on one already loaded), otherwise as listed."""
        return _load_order(self.models)


def _load_order(models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
    """`models`, each after the models it falls back on (depth first, as listed).

    Raises:
        FieldError: the fallbacks form a cycle, named alias by alias.
    """
    by_alias = {model.alias: model for model in models}
    ordered: dict[str, ModelConfig] = {}
    visiting: list[str] = []

    def visit(model: ModelConfig) -> None:
        if model.alias in ordered:
            return
        if model.alias in visiting:
            cycle = " -> ".join([*visiting[visiting.index(model.alias):], model.alias])
            raise FieldError(f"models[{models.index(by_alias[visiting[-1]])}].fallbacks",
                              f"the fallbacks form a cycle: {cycle}")
        visiting.append(model.alias)
        for alias in model.fallback_aliases:
            if alias in by_alias:
                visit(by_alias[alias])
        visiting.pop()
        ordered[model.alias] = model

    for model in models:
        visit(model)
    return tuple(ordered.values())


class ResponsesConfig(Section, frozen=True):
    """The Responses API's store (`corral.server.responses`)."""

    max_stored: _NonNegativeInt = 1000
    """How many finished responses are kept in memory, for `previous_response_id` and
    GET /v1/responses/{id}; the least recently used is dropped first. 0 keeps none."""


class ServerConfig(Section, frozen=True):
    """Where `corral serve` listens and how long it drains on shutdown."""

    http_host: _Name = "127.0.0.1"
    http_port: _Port = 8000
    jsonrpc: tuple[str, ...] = ()
    drain_timeout_ms: _NonNegativeInt = 30000
    max_body_bytes: _PositiveInt = 4194304
    body_timeout_ms: _PositiveInt = 30000
    keep_alive_timeout_ms: _PositiveInt = 5000
    max_connections: _PositiveInt | None = None
    max_streams_per_client: _PositiveInt | None = None
    admin_api_key: str | None = None
    """The key the admin routes (POST /v1/models/load and /v1/models/unload,
    `corral.server.admin`) require; null turns them off."""
    api_keys: tuple[str, ...] = ()
    """The keys the inference API accepts (`corral.server.auth`), in `Authorization:
    Bearer <key>` or `x-api-key: <key>`; every route but /health, /metrics and the
    admin routes then needs one. Empty: the API is open. `corral serve --api-key` and
    `CORRAL_API_KEY` replace them."""
    cors_origins: tuple[str, ...] = ()
    """The browser origins (`https://app.example`, or `*` for any) allowed to call the
    API across origins (CORS); empty: no CORS headers, so browsers of other origins
    are refused."""
    responses: ResponsesConfig = ResponsesConfig()

    def __post_init__(self) -> None:
        for index, uri in enumerate(self.jsonrpc):
            if not _LISTEN_URI.fullmatch(uri):
                raise FieldError(f"jsonrpc[{index}]", "expected 'stdio', 'tcp://HOST:PORT' "
                                  f"or 'unix://PATH', got {uri!r}")
        keys = [("admin_api_key", self.admin_api_key)] if self.admin_api_key is not None else []
        keys += [(f"api_keys[{index}]", key) for index, key in enumerate(self.api_keys)]
        for field, key in keys:
            if not _API_KEY.fullmatch(key):
                # A client sends a key in a header, whose value loses its outer spaces
                # and is read as Latin-1: a key no client could send is refused.
                raise FieldError(field, "expected 16 or more visible ASCII characters "
                                  "(no spaces, control or non-ASCII characters)")
        for index, origin in enumerate(self.cors_origins):
            if not _ORIGIN.fullmatch(origin):
                raise FieldError(f"cors_origins[{index}]", "expected '*' or an origin like "
                                  f"'https://app.example' (scheme and host, no path), got "
                                  f"{origin!r}")


class LoggingConfig(Section, frozen=True):
    """Log rendering and the minimum level emitted. `level: null` means info for
    `corral serve` and warning for a runtime embedded in another program, whose own
    output corral's info lines would crowd."""

    format: Literal["json", "console"] = "console"
    level: Literal["debug", "info", "warning", "error", "critical"] | None = None


class RuntimeConfig(Section, frozen=True):
    """The whole runtime configuration.

    `environments` keeps the raw overlays, the built-in ones
    (`corral.config.environment.BUILTIN_ENVIRONMENTS`) and the file's, so that a rendered
    config can be loaded again under another environment; the other sections are
    already resolved.
    """

    calls: CallsConfig = CallsConfig()
    json_rpc: JsonRpcConfig = JsonRpcConfig()
    restarts: RestartsConfig = RestartsConfig()
    python_runtime: PythonRuntimeConfig = PythonRuntimeConfig()
    stream_registry: StreamRegistryConfig = StreamRegistryConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    generation: GenerationConfig = GenerationConfig()
    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    environments: dict[str, dict[str, Any]] = msgspec.field(default_factory=builtin_environments)
