"""First-run frictions of the configuration (issue 23): the built-in environment
overlays, `CORRAL_<SECTION>__<KEY>` variables, models loaded in fallback order, and
config/runtime.yaml naming every key of the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from corral.config import ConfigError, RuntimeConfig, config_from_mapping, load_config

RUNTIME_YAML = Path(__file__).resolve().parent.parent / "config" / "runtime.yaml"


def _check_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "corral.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


# -- every key in config/runtime.yaml -----------------------------------------------------


def _struct_fields(struct: type[msgspec.Struct], prefix: str = "") -> list[tuple[str, bool]]:
    """Every field's dotted path under `struct`, with whether it is a section itself;
    list items (`generation.models[]`) are documented in a comment, not walked."""
    paths = []
    for field in msgspec.structs.fields(struct):
        path = f"{prefix}{field.name}"
        kind = field.type
        section = isinstance(kind, type) and issubclass(kind, msgspec.Struct)
        paths.append((path, section))
        if section:
            paths += _struct_fields(kind, path + ".")
    return paths


def test_runtime_yaml_names_every_key_of_the_schema() -> None:
    written = yaml.safe_load(RUNTIME_YAML.read_text(encoding="utf-8"))
    missing = []
    paths = _struct_fields(RuntimeConfig)
    for path, section in paths:
        node: Any = written
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(path)
                break
            node = node[part]
        else:
            if section and not isinstance(node, dict):
                missing.append(f"{path} (a section, written as a value)")
    assert missing == []
    assert "generation.prefix_cache.disk_dir" in {path for path, _ in paths}


# -- CORRAL_ENV without a file ------------------------------------------------------------


@pytest.mark.parametrize("name", ["development", "production", "test"])
def test_corral_env_picks_a_built_in_overlay_without_a_file(name: str) -> None:
    with_file = load_config(RUNTIME_YAML, environ={"CORRAL_ENV": name})
    without = load_config(environ={"CORRAL_ENV": name})
    assert without == with_file
    if name == "production":
        assert without.generation.isolation == "process"
        assert without.logging.format == "json"


def test_a_file_without_overlays_keeps_the_built_in_ones(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("stream_registry:\n  max_queued: 5\n"
                    "environments:\n  production:\n    logging: {level: warning}\n"
                    "  staging:\n    server: {http_port: 9001}\n")
    production = load_config(path, environ={"CORRAL_ENV": "production"})
    # A file's overlay replaces the built-in one of its name, whole.
    assert (production.logging.level, production.generation.isolation) == ("warning", "thread")
    test = load_config(path, environ={"CORRAL_ENV": "test"})
    assert (test.stream_registry.max_queued, test.server.drain_timeout_ms) == (5, 1000)
    assert load_config(path, env="staging", environ={}).server.http_port == 9001
    with pytest.raises(ConfigError, match="known: development, production, staging, test"):
        load_config(path, env="nope", environ={})


def test_a_built_in_overlay_is_not_checked_against_a_file_that_never_picks_it(
        tmp_path: Path) -> None:
    # The test overlay's retry delays (1 ms, at most 10) do not suit this file; only
    # choosing that overlay is an error.
    path = tmp_path / "slow.yaml"
    path.write_text("calls:\n  retry:\n    initial_delay_ms: 500\n    max_delay_ms: 9000\n")
    assert load_config(path, environ={}).calls.retry.initial_delay_ms == 500
    assert load_config(path, env="test", environ={}).calls.retry.max_delay_ms == 10


# -- CORRAL_<SECTION>__<KEY> variables ----------------------------------------------------


def test_variables_set_keys_after_the_file_and_the_overlay(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("server:\n  http_port: 7000\nlogging:\n  level: error\n")
    cfg = load_config(path, environ={
        "CORRAL_ENV": "development",  # sets logging.level: debug
        "CORRAL_SERVER__HTTP_PORT": "9000",
        "CORRAL_LOGGING__LEVEL": "warning",
        "CORRAL_GENERATION__PREFIX_CACHE__DISK_DIR": "/tmp/kv",
        "CORRAL_GENERATION__PREFIX_CACHE__ENABLED": "false",
        "CORRAL_PYTHON_RUNTIME__WORKER_MEMORY_LIMIT_MB": "null",
        "CORRAL_SERVER__JSONRPC": "[stdio]",
        "CORRAL_JSON_RPC__RETRY__MAX_ATTEMPTS": "5",  # an alias of calls.retry
        "CORRAL_CACHE_DIR": "/not/a/key",  # no double underscore: not a key
    })
    assert cfg.server.http_port == 9000
    assert cfg.logging.level == "warning"
    assert cfg.generation.prefix_cache.disk_dir == "/tmp/kv"
    assert cfg.generation.prefix_cache.enabled is False
    assert cfg.server.jsonrpc == ("stdio",)
    assert cfg.calls.retry.max_attempts == 5
    # Caller overrides (the command line's options) come last.
    cfg = load_config(path, environ={"CORRAL_SERVER__HTTP_PORT": "9000"},
                      overrides={"server": {"http_port": 9100}})
    assert cfg.server.http_port == 9100


@pytest.mark.parametrize(("variables", "error"), [
    ({"CORRAL_SERVER__PORT": "9000"},
     "server.port: unknown field (set by CORRAL_SERVER__PORT)"),
    ({"CORRAL_SERVERS__HTTP_PORT": "9000"},
     "servers: unknown field (set by CORRAL_SERVERS__HTTP_PORT)"),
    ({"CORRAL_SERVER__HTTP_PORT": "high"},
     "server.http_port: expected int, got str (set by CORRAL_SERVER__HTTP_PORT)"),
    ({"CORRAL_SERVER__HTTP_PORT": "70000"},
     "server.http_port: expected <= 65535 (set by CORRAL_SERVER__HTTP_PORT)"),
    ({"CORRAL_SERVER____HTTP_PORT": "1"},
     "CORRAL_SERVER____HTTP_PORT: expected CORRAL_<SECTION>__<KEY>, with one double "
     "underscore between the parts of the key"),
    ({"CORRAL_ENVIRONMENTS__TEST": "{}"},
     "CORRAL_ENVIRONMENTS__TEST: overlays cannot be set by variables; use a file"),
])
def test_a_bad_variable_is_an_error_naming_it(variables: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=variables)
    assert info.value.errors == [error]


def test_check_config_reports_a_bad_variable(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("{}\n")
    done = _check_config(path, CORRAL_SERVER__PORT="9000")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: server.port: unknown field (set by CORRAL_SERVER__PORT)"]
    done = _check_config(path, CORRAL_SERVER__HTTP_PORT="9000")
    assert done.returncode == 0 and "http_port: 9000" in done.stdout


# -- models load in fallback order --------------------------------------------------------


def _models(*specs: tuple[str, list[str]]) -> dict[str, Any]:
    return {"generation": {"models": [{"alias": alias, "path": f"/m/{alias}",
                                       "fallbacks": fallbacks} for alias, fallbacks in specs]}}


def test_models_load_after_their_fallbacks() -> None:
    cfg = config_from_mapping(_models(("chat", ["small", "mid"]), ("mid", ["small"]),
                                      ("small", []), ("other", [])))
    assert [m.alias for m in cfg.generation.models] == ["chat", "mid", "small", "other"]
    assert [m.alias for m in cfg.generation.models_in_load_order] == [
        "small", "mid", "chat", "other"]


def test_a_fallback_cycle_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(_models(("a", ["b"]), ("b", ["c"]), ("c", ["a"])))
    assert info.value.errors == [
        "generation.models[2].fallbacks: the fallbacks form a cycle: a -> b -> c -> a"]


def test_check_config_reports_cycles_and_unknown_fallbacks(tmp_path: Path) -> None:
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text(yaml.safe_dump(_models(("chat", ["small"]), ("small", ["chat"]))))
    done = _check_config(cycle)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: generation.models[1].fallbacks: the fallbacks form a cycle: "
        "chat -> small -> chat"]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(_models(("chat", ["small"]))))
    done = _check_config(unknown)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: generation.models[0].fallbacks[0]: expected the alias of another "
        "configured model, got 'small'"]
