"""The runtime configuration: typed, frozen, validated in one place.

A YAML file (config/runtime.yaml), an optional `environments.<name>` overlay and
caller overrides are merged here and decoded into the frozen Structs below; every other
module receives a `RuntimeConfig`, never a dict. The Struct defaults are the single
source of truth and config/runtime.yaml documents them key by key (a test keeps the
two equal). A bad key or value is a `ConfigError` naming its path. This module reads
one file and never starts anything, opens a socket, or configures logging.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec
import msgspec.inspect
import yaml

from corral.protocol.errors import resolve_error_name
from corral.protocol.messages import Alias

__all__ = [
    "ALIASES",
    "BackoffConfig",
    "CallsConfig",
    "CircuitBreakerConfig",
    "ConfigError",
    "GenerationConfig",
    "JsonRpcConfig",
    "LoggingConfig",
    "ModelConfig",
    "PrefixCacheConfig",
    "PythonRuntimeConfig",
    "RestartsConfig",
    "RetryBudgetConfig",
    "RetryConfig",
    "RuntimeConfig",
    "ServerConfig",
    "StreamRegistryConfig",
    "SupervisionConfig",
    "config_from_mapping",
    "config_warnings",
    "deep_merge",
    "load_config",
    "render_config",
]

_PositiveInt: TypeAlias = Annotated[int, msgspec.Meta(ge=1)]
_NonNegativeInt: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]
_Fraction: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Rate: TypeAlias = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
_Name: TypeAlias = Annotated[str, msgspec.Meta(min_length=1)]
_Port: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=65535)]

_API_KEY: Final = re.compile(r"[\x21-\x7e]{16,}")
_LISTEN_URI: Final = re.compile(r"stdio|tcp://(?:\[[^\]\s]+\]|[^/\s:\[\]]+):\d{1,5}|unix://\S+")


class _FieldError(ValueError):
    """A cross-field check failed in `__post_init__`; `field` is relative to the Struct.

    msgspec reports such errors at the Struct's path and keeps the exception as the
    cause, so `_translate` can append `field` and name the exact key.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Common options of every config Struct."""


class RetryBudgetConfig(_Section, frozen=True):
    """A token bucket shared by all callers, as in gRPC retry throttling."""

    enabled: bool = True
    max_tokens: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    token_ratio: _Rate = 0.1


class RetryConfig(_Section, frozen=True):
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
            raise _FieldError("max_delay_ms", "expected >= initial_delay_ms")
        for index, name in enumerate(self.retryable_errors):
            try:
                resolve_error_name(name)
            except ValueError as exc:
                raise _FieldError(f"retryable_errors[{index}]", str(exc)) from None


class CircuitBreakerConfig(_Section, frozen=True):
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


class CallsConfig(_Section, frozen=True):
    """Every call the runtime makes to a model or an actor, whatever the transport: the
    default deadline of an ask, the retry policy around a model call, the circuit
    breaker of each model. (`json_rpc.default_timeout_ms`, `json_rpc.retry` and
    `json_rpc.circuit_breaker` are aliases, from the format corral started from.)"""

    default_timeout_ms: _PositiveInt = 30000
    retry: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()


class JsonRpcConfig(_Section, frozen=True):
    """What one JSON-RPC connection may send and hold."""

    max_line_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1048576
    max_pending_per_connection: _PositiveInt = 64
    max_streams_per_connection: _PositiveInt = 16


class RestartsConfig(_Section, frozen=True):
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
            raise _FieldError("delay_max_ms", "expected >= delay_base_ms")


class PythonRuntimeConfig(_Section, frozen=True):
    """How engine worker processes (process isolation) are started and watched."""

    startup_timeout_ms: _PositiveInt = 60000
    heartbeat_interval_ms: _PositiveInt = 1000
    python_executable: _Name | None = None
    standby_worker: bool = True
    worker_memory_limit_mb: _PositiveInt | None = None  # None: 3/4 of physical memory


class StreamRegistryConfig(_Section, frozen=True):
    """Admission, deadlines and idle-reader limits of the stream registry."""

    default_timeout_ms: _PositiveInt = 300000
    max_active_streams: _PositiveInt = 32  # = generation.completion_batch_size
    max_queued: _NonNegativeInt = 64
    idle_reader_timeout_ms: _PositiveInt = 30000
    overloaded_retry_after_ms: _NonNegativeInt = 1000


class BackoffConfig(_Section, frozen=True):
    """Exponential backoff between a supervisor's restarts of one child."""

    min_ms: _NonNegativeInt = 10
    max_ms: _NonNegativeInt = 5000
    random_factor: _Fraction = 0.2
    reset_after_ms: _PositiveInt = 30000

    def __post_init__(self) -> None:
        if self.max_ms < self.min_ms:
            raise _FieldError("max_ms", "expected >= min_ms")


class SupervisionConfig(_Section, frozen=True):
    """Restart intensity, backoff and mailbox bounds for every supervisor and actor."""

    max_restarts: _NonNegativeInt = 3
    period_ms: _PositiveInt = 5000
    backoff: BackoffConfig = BackoffConfig()
    mailbox_capacity: _PositiveInt = 1024
    stash_limit: _NonNegativeInt = 256
    shutdown_timeout_ms: _PositiveInt = 5000
    fairness_interval: _PositiveInt = 64


class FallbackResponse(_Section, frozen=True):
    """A last fallback: the last good completion within `cached_ttl_ms`, or `default`."""

    cached_ttl_ms: _PositiveInt | None = None
    default: str | None = None

    def __post_init__(self) -> None:
        if (self.cached_ttl_ms is None) == (self.default is None):
            raise _FieldError("cached_ttl_ms", "expected exactly one of cached_ttl_ms and default")


class ModelConfig(_Section, frozen=True):
    """A model loaded at start: its alias (see `corral.protocol.messages.ALIAS_PATTERN`),
    its path, and its fallbacks: other models' aliases, then optionally cached and
    default response steps. `chat_template` replaces the model's own: a Jinja template,
    or the path of a file holding one."""

    alias: Alias
    path: _Name
    fallbacks: tuple[Alias | FallbackResponse, ...] = ()
    chat_template: _Name | None = None

    @property
    def fallback_aliases(self) -> tuple[str, ...]:
        return tuple(step for step in self.fallbacks if isinstance(step, str))

    @property
    def fallback_responses(self) -> tuple[FallbackResponse, ...]:
        return tuple(step for step in self.fallbacks if isinstance(step, FallbackResponse))


class PrefixCacheConfig(_Section, frozen=True):
    """Reuse of the KV cache of shared prompt prefixes, in memory and optionally on disk.

    `max_bytes: null` means one eighth of the machine's physical memory
    (`corral.engine.prefix_cache.default_prefix_cache_bytes`).
    """

    enabled: bool = True
    max_bytes: _NonNegativeInt | None = None
    disk_dir: _Name | None = None
    disk_min_tokens: _PositiveInt = 256
    disk_max_bytes: _NonNegativeInt = 4 * 1024**3


class GenerationConfig(_Section, frozen=True):
    """The generation domain: engine isolation, models, and batching limits."""

    isolation: Literal["thread", "process"] = "thread"
    cpu_blas: Literal["auto", "reference"] = "auto"
    models: tuple[ModelConfig, ...] = ()
    default_max_tokens: _PositiveInt | None = 256
    max_tokens_limit: _PositiveInt | None = None
    max_prompt_tokens: _PositiveInt | None = None
    stall_timeout_ms: _PositiveInt = 30000
    prefill_batch_size: _PositiveInt = 8
    completion_batch_size: _PositiveInt = 32
    prefill_step_size: _PositiveInt = 2048
    prefill_step_target_ms: _PositiveInt = 2000
    cpu_dequantize: Literal["auto", "off"] = "auto"
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig()

    def __post_init__(self) -> None:
        if (self.max_tokens_limit is not None and self.default_max_tokens is not None
                and self.default_max_tokens > self.max_tokens_limit):
            raise _FieldError("default_max_tokens", "expected <= max_tokens_limit")
        aliases: set[str] = set()
        for index, model in enumerate(self.models):
            if model.alias in aliases:
                raise _FieldError(f"models[{index}].alias", f"duplicate alias {model.alias!r}")
            aliases.add(model.alias)
        for index, model in enumerate(self.models):
            for position, fallback in enumerate(model.fallbacks):
                if not isinstance(fallback, str):
                    continue
                if position >= len(model.fallback_aliases):
                    raise _FieldError(f"models[{index}].fallbacks[{position}]",
                                      "expected model aliases before cached and default steps")
                if fallback == model.alias or fallback not in aliases:
                    raise _FieldError(
                        f"models[{index}].fallbacks[{position}]",
                        f"expected the alias of another configured model, got {fallback!r}",
                    )


class ServerConfig(_Section, frozen=True):
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
    admin_api_key: Annotated[str, msgspec.Meta(min_length=16)] | None = None
    responses_max_stored: _NonNegativeInt = 1000  # for previous_response_id; LRU, 0: none

    def __post_init__(self) -> None:
        for index, uri in enumerate(self.jsonrpc):
            if not _LISTEN_URI.fullmatch(uri):
                raise _FieldError(f"jsonrpc[{index}]", "expected 'stdio', 'tcp://HOST:PORT' "
                                  f"or 'unix://PATH', got {uri!r}")
        if self.admin_api_key is not None and not _API_KEY.fullmatch(self.admin_api_key):
            # A client sends the key in an Authorization header, whose value loses its
            # outer spaces and is read as Latin-1: a key no client could send is refused.
            raise _FieldError("admin_api_key", "expected 16 or more visible ASCII characters "
                              "(no spaces, control or non-ASCII characters)")


class LoggingConfig(_Section, frozen=True):
    """Log rendering and the minimum level emitted. `level: null` means info for
    `corral serve` and warning for a runtime embedded in another program, whose own
    output corral's info lines would crowd."""

    format: Literal["json", "console"] = "console"
    level: Literal["debug", "info", "warning", "error", "critical"] | None = None


class RuntimeConfig(_Section, frozen=True):
    """The whole runtime configuration.

    `environments` keeps the raw overlays from the file so that a rendered config can be
    loaded again under another environment; the other sections are already resolved.
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
    environments: dict[str, dict[str, Any]] = {}


class ConfigError(Exception):
    """The configuration cannot be used.

    Attributes:
        errors: one line per problem, each starting with the path of the key it is
            about, e.g. `json_rpc.retry.jitter: expected <= 1`.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: `overlay` merged into `base`.

    Mappings present on both sides merge recursively; any other value in `overlay`
    (lists included) replaces the one in `base`. Neither argument is modified.
    """
    merged = dict(base)
    for key, value in overlay.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def config_from_mapping(data: Mapping[str, Any]) -> RuntimeConfig:
    """Decode and validate plain data (as read from YAML) into a `RuntimeConfig`.

    No environment overlay is applied, but each overlay under `environments` is checked
    by decoding it on top of the rest of `data`; its problems are reported with the
    prefix `environments.<name>.`.

    Raises:
        ConfigError: listing every problem found, each named by its path.
    """
    return _validate(data, check_overlays=True)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RuntimeConfig:
    """Read, merge and validate the runtime configuration.

    The file is validated as written (overlays included), then the overlay
    `environments[env]` is deep-merged into it, then `overrides`, and the result is
    decoded.

    Args:
        path: a YAML file; None uses the Struct defaults alone.
        env: the overlay to apply; None reads `CORRAL_ENV`, and an empty string (or an
            unset variable) applies none.
        overrides: values merged last, shaped like the file (nested mappings).

    Returns:
        The resolved configuration, with the file's overlays kept in `environments`.

    Raises:
        ConfigError: the file cannot be read or parsed, the environment is not defined,
            or a key or value is invalid.
    """
    data = _read_yaml(path) if path is not None else {}
    config = config_from_mapping(data)
    source = ""
    if env is None:
        env, source = os.environ.get("CORRAL_ENV"), " (set by CORRAL_ENV)"
    if not env and not overrides:
        return config
    if env:
        if env not in config.environments:
            known = ", ".join(sorted(config.environments)) or "none"
            raise ConfigError([f"environments.{env}: unknown environment{source}; known: {known}"])
        data = deep_merge(_dealias(data)[0], _dealias(config.environments[env])[0])
    if overrides:
        # Aliases name the same keys: merged under one name, or they would clash.
        data = deep_merge(_dealias(data)[0], _dealias(overrides)[0])
    # The overlays were checked against the file as written; checking them again on top
    # of the chosen one would blame them for combinations nobody configured.
    return _validate(data, check_overlays=False)


def config_warnings(cfg: RuntimeConfig) -> list[str]:
    """Settings that are valid but work against each other, one line each."""
    warnings = []
    active = cfg.stream_registry.max_active_streams
    batch = cfg.generation.completion_batch_size
    if active != batch:
        effect = ("requests wait for a whole generation while the batch has room"
                  if active < batch else "streams beyond the batch wait inside the engine")
        warnings.append(
            f"stream_registry.max_active_streams ({active}) differs from "
            f"generation.completion_batch_size ({batch}): {effect}")
    return warnings


def render_config(cfg: RuntimeConfig) -> str:
    """The configuration as YAML, in declaration order; `load_config` reads it back."""
    text: str = yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False)
    return text


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{name}: expected a mapping at the top level, got {_kind(data)}"])
    return data


def _validate(data: Mapping[str, Any], *, check_overlays: bool) -> RuntimeConfig:
    errors: list[str] = []
    environments = _check_environments(data.get("environments", {}), errors)
    base = {key: value for key, value in data.items() if key != "environments"}
    config, base_errors = _decode(base)
    errors.extend(base_errors)
    for name, overlay in environments.items() if check_overlays else ():
        _, overlay_errors = _decode(deep_merge(base, overlay))
        # A problem the base already has is reported once, not again for each overlay.
        errors.extend(f"environments.{name}.{error}" for error in overlay_errors
                      if error not in base_errors)
    if errors or config is None:
        raise ConfigError(errors)
    return msgspec.structs.replace(config, environments=environments)


def _check_environments(raw: Any, errors: list[str]) -> dict[str, dict[str, Any]]:
    """The overlays that are well-formed mappings; problems with the others go to errors."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errors.append(f"environments: expected a mapping of name to overlay, got {_kind(raw)}")
        return {}
    environments: dict[str, dict[str, Any]] = {}
    for name, overlay in raw.items():
        if not isinstance(name, str) or not name:
            errors.append(f"environments: expected a non-empty string name, got {name!r}")
        elif overlay is None:
            # A YAML key whose body is all commented out: an empty overlay, not an error.
            environments[name] = {}
        elif not isinstance(overlay, Mapping):
            errors.append(f"environments.{name}: expected a mapping, got {_kind(overlay)}")
        elif "environments" in overlay:
            errors.append(f"environments.{name}.environments: overlays cannot nest")
        else:
            environments[name] = dict(overlay)
    return environments


ALIASES: Final[Mapping[str, str]] = {
    "json_rpc.default_timeout_ms": "calls.default_timeout_ms",
    "json_rpc.retry": "calls.retry",
    "json_rpc.circuit_breaker": "calls.circuit_breaker",
    "python_runtime.max_restarts": "restarts.max_restarts",
    "python_runtime.restart_period_ms": "restarts.period_ms",
    "python_runtime.restart_delay_base_ms": "restarts.delay_base_ms",
    "python_runtime.restart_delay_max_ms": "restarts.delay_max_ms",
    "python_runtime.reload_delay_max_ms": "restarts.reload_delay_max_ms",
}
"""Keys of the format corral started from (left) and the keys they set (right)."""


def _dealias(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """`data` with every alias moved to its key; the moves made (key -> alias as
    written), and an error for each alias given beside its key."""
    moved: dict[str, Any] = {}
    for section, value in data.items():
        for alias, key in ALIASES.items():  # new sections stand where the file's stood
            new_section = key.split(".")[0]
            if (alias.split(".")[0] == section and isinstance(value, Mapping)
                    and alias.split(".")[1] in value and new_section not in data):
                moved.setdefault(new_section, {})
        moved[section] = dict(value) if isinstance(value, Mapping) else value
    renames: dict[str, str] = {}
    clashes: list[str] = []
    for alias, key in ALIASES.items():
        old_section, old_key = alias.split(".")
        new_section, new_key = key.split(".")
        source = moved.get(old_section)
        if not isinstance(source, dict) or old_key not in source:
            continue
        target = moved.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # the section's own error is reported by decoding
        value = source.pop(old_key)
        if new_key in target:
            clashes.append(f"{alias}: also given as {key}; give one of them")
            continue
        target[new_key] = value
        renames[key] = alias
    return moved, renames, clashes


def _decode(data: Mapping[str, Any]) -> tuple[RuntimeConfig | None, list[str]]:
    data, renames, clashes = _dealias(data)
    try:
        config = msgspec.convert(data, RuntimeConfig)
    except msgspec.ValidationError as exc:
        errors = _every_error(data, RuntimeConfig, "") or [_translate(exc)]
        return None, clashes + [_as_written(error, renames) for error in errors]
    return (None, clashes) if clashes else (config, [])


def _as_written(error: str, renames: Mapping[str, str]) -> str:
    """An error about a key the file set through its alias names the alias."""
    for key, alias in renames.items():
        if error.startswith((f"{key}:", f"{key}.", f"{key}[")):
            return alias + error[len(key):]
    return error


def _every_error(data: Any, section: type[_Section], path: str) -> list[str]:
    """Every problem in `data` for `section`, not only the first that msgspec meets:
    each key is checked on its own (sections key by key), then the whole section for
    the checks that span keys."""
    if not isinstance(data, Mapping):
        return _section_errors(data, section, path)
    fields = {f.name: f.type for f in msgspec.structs.fields(section)}
    errors: list[str] = []
    for key, value in data.items():
        where = _join(path, str(key))
        if key not in fields:
            errors.append(f"{where}: unknown key")
            continue
        kind = fields[key]
        if isinstance(kind, type) and issubclass(kind, _Section) and isinstance(value, Mapping):
            errors.extend(_every_error(value, kind, where))
        else:
            errors.extend(_section_errors({key: value}, section, path))
    return errors or _section_errors(data, section, path)


def _section_errors(data: Any, section: type[_Section], path: str) -> list[str]:
    try:
        msgspec.convert(data, section)
    except msgspec.ValidationError as exc:
        return [_translate(exc, path)]
    return []


_FIELD: Final = re.compile(
    r"^Object (?P<what>contains unknown|missing required) field `(?P<key>[^`]*)`$"
)
_BOUND: Final = re.compile(
    r"^Expected `[^`]*` (?P<length>of length )?(?P<op>[<>]=?) (?P<number>\S+)$"
)
_TYPE: Final = re.compile(r"^Expected `(?P<expected>[^`]*)`, got `(?P<got>[^`]*)`$")
_ENUM: Final = re.compile(r"^Invalid enum value (?P<value>.*)$")
_MSGSPEC_KINDS: Final = {"object": "mapping", "array": "list"}


def _translate(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """msgspec's `<Message> - at `$.a.b`` as `a.b: <message>` (under `prefix`, the path
    of the section that was decoded)."""
    message, at, where = str(exc).rpartition(" - at `$")
    if not at:
        message, where = where, ""
    relative = where.rstrip("`").lstrip(".")
    if not prefix or not relative:
        path = prefix or relative
    else:
        path = prefix + relative if relative.startswith("[") else f"{prefix}.{relative}"
    cause = exc.__cause__
    if isinstance(cause, _FieldError):
        return f"{_join(path, cause.field)}: {cause}"
    if field := _FIELD.match(message):
        path = _join(path, field["key"])
        message = "unknown key" if field["what"] == "contains unknown" else "required key missing"
    elif bound := _BOUND.match(message):
        length = "length " if bound["length"] else ""
        message = f"expected {length}{bound['op']} {_number(bound['number'])}"
    elif kinds := _TYPE.match(message):
        expected = " | ".join(_MSGSPEC_KINDS.get(k, k) for k in kinds["expected"].split(" | "))
        message = f"expected {expected}, got {_MSGSPEC_KINDS.get(kinds['got'], kinds['got'])}"
    elif enum := _ENUM.match(message):
        choices = _literal_choices(path)
        message = (f"expected one of {', '.join(map(repr, choices))}, got {enum['value']}"
                   if choices else f"invalid value {enum['value']}")
    else:
        message = message.replace("`", "")
        message = message[:1].lower() + message[1:]
    return f"{path or '(root)'}: {message}"


def _join(path: str, field: str) -> str:
    if not path:
        return field
    return f"{path}{field}" if field.startswith("[") else f"{path}.{field}"


def _number(text: str) -> str:
    """`1.0` as `1`, so a bound reads as it was configured."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def _literal_choices(path: str) -> tuple[Any, ...]:
    """The values a Literal at `path` allows, or () if the path does not lead to one."""
    node: msgspec.inspect.Type = msgspec.inspect.type_info(RuntimeConfig)
    for segment in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        node = _unwrap(node)
        if segment.startswith("["):
            if not isinstance(node, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
                return ()
            node = node.item_type
        elif isinstance(node, msgspec.inspect.StructType):
            fields = {field.name: field.type for field in node.fields}
            if segment not in fields:
                return ()
            node = fields[segment]
        else:
            return ()
    node = _unwrap(node)
    return tuple(node.values) if isinstance(node, msgspec.inspect.LiteralType) else ()


def _unwrap(node: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The non-null member of an optional type."""
    if isinstance(node, msgspec.inspect.UnionType):
        members = [t for t in node.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(members) == 1:
            return members[0]
    return node


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__
