"""Tests for corral.config: defaults, overlays, path-named errors, rendering."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from corral.config import (
    ALIASES,
    ConfigError,
    GenerationConfig,
    LoggingConfig,
    RetryConfig,
    RuntimeConfig,
    config_from_mapping,
    config_warnings,
    deep_merge,
    load_config,
    render_config,
)
from corral.config.environment import BUILTIN_ENVIRONMENTS
from corral.protocol.errors import Code, resolve_error_name
from corral.protocol.worker import EngineSettings, EngineTuning, Load, ToWorker

RUNTIME_YAML = Path(__file__).resolve().parent.parent / "config" / "runtime.yaml"


@pytest.fixture(autouse=True)
def _no_corral_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_ENV", raising=False)


def _errors(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    return info.value.errors


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runtime.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_runtime_yaml_matches_struct_defaults() -> None:
    cfg = load_config(RUNTIME_YAML)
    assert cfg == RuntimeConfig()
    assert set(cfg.environments) == {"development", "production", "test"}
    # The file's overlays are the built-in ones, which CORRAL_ENV finds without a file.
    written = yaml.safe_load(RUNTIME_YAML.read_text(encoding="utf-8"))["environments"]
    assert written == BUILTIN_ENVIRONMENTS


def test_every_overlay_in_runtime_yaml_loads() -> None:
    for name in ("development", "production", "test"):
        load_config(RUNTIME_YAML, env=name)


def test_no_path_gives_defaults() -> None:
    assert load_config() == RuntimeConfig()


def test_seed_defaults() -> None:
    cfg = RuntimeConfig()
    assert cfg.calls.default_timeout_ms == 30000
    retry = cfg.calls.retry
    assert (retry.max_attempts, retry.initial_delay_ms, retry.max_delay_ms) == (3, 100, 5000)
    assert (retry.backoff_multiplier, retry.jitter) == (2.0, 0.25)
    assert retry.retryable_errors == ("TIMEOUT", "ECONNRESET")
    breaker = cfg.calls.circuit_breaker
    assert (
        breaker.failure_threshold,
        breaker.recovery_timeout_ms,
        breaker.half_open_max_calls,
        breaker.half_open_success_threshold,
        breaker.failure_window_ms,
    ) == (5, 10000, 1, 2, 60000)
    assert cfg.restarts.max_restarts == 3
    assert cfg.restarts.delay_base_ms == 1000
    assert cfg.stream_registry.default_timeout_ms == 300000
    assert cfg.stream_registry.max_active_streams == 32 == cfg.generation.completion_batch_size


def test_retryable_error_names_resolve_to_codes() -> None:
    assert [resolve_error_name(n) for n in RetryConfig().retryable_errors] == [
        Code.TIMEOUT,
        Code.TRANSPORT_ERROR,
    ]
    assert resolve_error_name("Overloaded") is Code.OVERLOADED
    assert resolve_error_name("CIRCUIT_OPEN") is Code.CIRCUIT_OPEN
    with pytest.raises(ValueError, match="unknown error code"):
        resolve_error_name("EBOGUS")
    retry = config_from_mapping(
        {"json_rpc": {"retry": {"retryable_errors": ["Overloaded", "CIRCUIT_OPEN"]}}}
    ).calls.retry
    assert retry.retryable_errors == ("Overloaded", "CIRCUIT_OPEN")


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = deep_merge(base, {"a": {"c": [3]}, "e": 2})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


def test_overlay_chosen_by_corral_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_ENV", "production")
    cfg = load_config(RUNTIME_YAML)
    assert cfg.logging == LoggingConfig(format="json", level="info")
    assert RuntimeConfig().logging.level is None  # info serving, warning embedded
    assert cfg.generation.isolation == "process"
    # Keys the overlay does not name keep the file's values.
    assert cfg.generation.default_max_tokens == 256
    assert cfg.json_rpc == RuntimeConfig().json_rpc


def test_overlay_chosen_by_argument_wins_over_corral_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CORRAL_ENV", "production")
    cfg = load_config(RUNTIME_YAML, env="test")
    assert cfg.logging.format == "console"
    retry = cfg.calls.retry
    assert (retry.initial_delay_ms, retry.max_delay_ms, retry.max_attempts) == (1, 10, 3)
    assert cfg.supervision.backoff.random_factor == 0.2


def test_empty_env_argument_applies_no_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_ENV", "production")
    assert load_config(RUNTIME_YAML, env="").logging == LoggingConfig()


def test_overrides_merge_after_the_overlay() -> None:
    cfg = load_config(
        RUNTIME_YAML,
        env="development",
        overrides={"logging": {"format": "json"}, "json_rpc": {"retry": {"max_attempts": 5}}},
    )
    assert cfg.logging == LoggingConfig(format="json", level="debug")
    assert cfg.calls.retry.max_attempts == 5
    assert cfg.calls.retry.jitter == 0.25


def test_unknown_key_names_its_path() -> None:
    assert _errors({"json_rpc": {"retry": {"bogus": 1}}}) == ["json_rpc.retry.bogus: unknown field"]
    assert _errors({"bogus": {}}) == ["bogus: unknown field"]


def test_out_of_range_value_names_its_path() -> None:
    assert _errors({"json_rpc": {"retry": {"jitter": 2}}}) == [
        "json_rpc.retry.jitter: expected <= 1"
    ]
    assert _errors({"json_rpc": {"retry": {"max_attempts": 0}}}) == [
        "json_rpc.retry.max_attempts: expected >= 1"
    ]


def test_wrong_type_names_its_path() -> None:
    assert _errors({"stream_registry": {"max_active_streams": "ten"}}) == [
        "stream_registry.max_active_streams: expected int, got str"
    ]
    assert _errors({"json_rpc": []}) == ["json_rpc: expected object, got array"]


def test_bad_literal_lists_the_choices() -> None:
    [error] = _errors({"logging": {"level": "loud"}})
    assert error.startswith("logging.level: expected one of ")
    assert "'debug'" in error and "got 'loud'" in error


def test_unknown_retryable_error_name() -> None:
    [error] = _errors({"json_rpc": {"retry": {"retryable_errors": ["Timeout", "EBOGUS"]}}})
    assert error.startswith("json_rpc.retry.retryable_errors[1]: unknown error code 'EBOGUS'")


def test_cross_field_checks_name_the_key() -> None:
    assert _errors({"json_rpc": {"retry": {"initial_delay_ms": 10000}}}) == [
        "json_rpc.retry.max_delay_ms: expected >= initial_delay_ms"
    ]
    models = [{"alias": "a", "path": "/m/a", "fallbacks": ["b"]}]
    [error] = _errors({"generation": {"models": models}})
    assert error.startswith("generation.models[0].fallbacks[0]: ")
    [error] = _errors({"server": {"jsonrpc": ["stdio", "tcp://nohost"]}})
    assert error.startswith("server.jsonrpc[1]: ")


def test_models_and_listeners_decode() -> None:
    cfg = config_from_mapping(
        {
            "generation": {
                "models": [
                    {"alias": "big", "path": "/m/big", "fallbacks": ["tiny"]},
                    {"alias": "tiny", "path": "/m/tiny"},
                ]
            },
            "server": {"jsonrpc": ["stdio", "tcp://127.0.0.1:9000", "unix:///tmp/x.sock"]},
        }
    )
    assert [m.alias for m in cfg.generation.models] == ["big", "tiny"]
    assert cfg.generation.models[0].fallbacks == ("tiny",)
    assert len(cfg.server.jsonrpc) == 3


def test_missing_required_key() -> None:
    assert _errors({"generation": {"models": [{"alias": "a"}]}}) == [
        "generation.models[0].path: required field missing"
    ]


def test_unknown_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(RUNTIME_YAML, env="staging")
    [error] = info.value.errors
    assert error.startswith("environments.staging: unknown environment")
    monkeypatch.setenv("CORRAL_ENV", "staging")
    with pytest.raises(ConfigError, match="CORRAL_ENV"):
        load_config(RUNTIME_YAML)


def test_bad_overlay_is_reported_under_its_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "environments:\n  prod:\n    logging:\n      colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["environments.prod.logging.colour: unknown field"]


def test_base_error_is_not_repeated_for_each_overlay() -> None:
    errors = _errors({"logging": {"level": "loud"}, "environments": {"a": {}, "b": {}}})
    assert len(errors) == 1 and errors[0].startswith("logging.level: ")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "logging:\n  format: json\n  level: [info\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [error] = info.value.errors
    assert error.startswith(f"{path}:")
    line = int(error[len(str(path)) + 1:].split(":")[0])
    assert line >= 3


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(missing)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == RuntimeConfig()


def test_config_error_str_joins_errors() -> None:
    assert str(ConfigError(["a: x", "b: y"])) == "a: x\nb: y"


@pytest.mark.parametrize("env", ["", "development", "production", "test"])
def test_render_round_trip(tmp_path: Path, env: str) -> None:
    cfg = load_config(RUNTIME_YAML, env=env)
    rendered = _write(tmp_path, render_config(cfg))
    assert load_config(rendered) == cfg


def test_render_round_trip_with_models(tmp_path: Path) -> None:
    cfg = config_from_mapping(
        {
            "generation": {"models": [{"alias": "tiny", "path": "/m/tiny"}]},
            "json_rpc": {"circuit_breaker": {"failure_rate_threshold": 0.5}},
        }
    )
    assert load_config(_write(tmp_path, render_config(cfg))) == cfg


def test_every_error_of_a_file_is_reported_in_one_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("json_rpc:\n  retry:\n    jitter: 2\n    max_attempts: 0\n  nope: 1\n"
                   "stream_registry:\n  max_active_streams: -1\n"
                   "generation:\n  isolation: fork\n  default_max_tokens: 9000\n"
                   "  max_tokens_limit: 100\n"
                   "logging:\n  level: loud\n")
    result = subprocess.run([sys.executable, "-m", "corral.cli", "check-config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: json_rpc.retry.jitter: expected <= 1",
        "error: json_rpc.retry.max_attempts: expected >= 1",
        "error: json_rpc.nope: unknown field",
        "error: stream_registry.max_active_streams: expected >= 1",
        "error: generation.isolation: expected one of 'process', 'thread', got 'fork'",
        "error: generation.default_max_tokens: expected <= max_tokens_limit",
        "error: logging.level: expected one of 'critical', 'debug', 'error', 'info', "
        "'warning', got 'loud'",
    ]
    good = tmp_path / "good.yaml"
    good.write_text("stream_registry:\n  max_active_streams: 8\n")
    result = subprocess.run([sys.executable, "-m", "corral.cli", "check-config", str(good)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "max_active_streams: 8" in result.stdout


def test_the_engine_keys_are_one_declaration_from_config_to_worker() -> None:
    """`generation`'s engine keys and `EngineSettings` both inherit `EngineTuning`'s
    fields and re-declare none, so each key's type, range and default is written once;
    every key set in the file reaches the settings the worker's Load frame carries."""
    tuning = msgspec.structs.fields(EngineTuning)
    for holder in (GenerationConfig, EngineSettings):
        assert issubclass(holder, EngineTuning)
        assert not set(inspect.get_annotations(holder)) & set(EngineTuning.__struct_fields__)
        own = {f.name: f for f in msgspec.structs.fields(holder)}
        assert all(own[f.name] == f for f in tuning), holder

    generation = config_from_mapping({"generation": {
        "prefill_batch_size": 3, "completion_batch_size": 5, "prefill_step_size": 7,
        "prefill_step_target_ms": 11, "cpu_dequantize": "off",
        "prefix_cache": {"enabled": False}}}).generation
    settings = EngineSettings.of(generation, "/models/m", "{{ messages }}")
    assert (settings.path, settings.chat_template) == ("/models/m", "{{ messages }}")
    for field in tuning:
        assert getattr(settings, field.name) == getattr(generation, field.name) != field.default
    frame = msgspec.msgpack.encode(Load(settings))
    assert msgspec.msgpack.decode(frame, type=ToWorker) == Load(settings)


def test_an_admission_limit_unlike_the_batch_size_is_warned_about() -> None:
    assert config_warnings(RuntimeConfig()) == []
    narrow = config_from_mapping({"stream_registry": {"max_active_streams": 10}})
    [warning] = config_warnings(narrow)
    assert warning.startswith("stream_registry.max_active_streams (10) differs from "
                              "generation.completion_batch_size (32)")


def test_the_seed_keys_are_aliases_of_calls_and_restarts() -> None:
    """json_rpc.{default_timeout_ms,retry,circuit_breaker} and python_runtime's restart
    keys load the same values as calls.* and restarts.*; errors name what was written,
    and giving a key under both names is an error."""
    seed = config_from_mapping({
        "json_rpc": {"default_timeout_ms": 1234, "retry": {"max_attempts": 7},
                     "circuit_breaker": {"failure_threshold": 9}, "max_line_bytes": 4096},
        "python_runtime": {"max_restarts": 5, "restart_period_ms": 1000,
                           "restart_delay_base_ms": 20, "restart_delay_max_ms": 40,
                           "reload_delay_max_ms": 5000, "startup_timeout_ms": 777}})
    named = config_from_mapping({
        "calls": {"default_timeout_ms": 1234, "retry": {"max_attempts": 7},
                  "circuit_breaker": {"failure_threshold": 9}},
        "json_rpc": {"max_line_bytes": 4096},
        "restarts": {"max_restarts": 5, "period_ms": 1000, "delay_base_ms": 20,
                     "delay_max_ms": 40, "reload_delay_max_ms": 5000},
        "python_runtime": {"startup_timeout_ms": 777}})
    assert seed == named
    assert set(ALIASES) == {
        "json_rpc.default_timeout_ms", "json_rpc.retry", "json_rpc.circuit_breaker",
        "python_runtime.max_restarts", "python_runtime.restart_period_ms",
        "python_runtime.restart_delay_base_ms", "python_runtime.restart_delay_max_ms",
        "python_runtime.reload_delay_max_ms"}
    assert _errors({"python_runtime": {"restart_delay_base_ms": -1}}) == [
        "python_runtime.restart_delay_base_ms: expected >= 0"]
    assert _errors({"json_rpc": {"retry": {"jitter": 2}}, "calls": {"retry": {}}}) == [
        "json_rpc.retry: also given as calls.retry; give one of them"]
