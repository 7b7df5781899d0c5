"""What the process environment chooses in the configuration: the built-in `environments`
overlays (`CORRAL_ENV` picks one, with a config file or without), and one key at a time,
variables named `CORRAL_<SECTION>__<KEY>` (`CORRAL_SERVER__HTTP_PORT=9000`).

Pure data work: the caller passes the variables in; nothing here reads a file, decodes
a `RuntimeConfig` or looks at `os.environ` on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

import yaml

__all__ = ["BUILTIN_ENVIRONMENTS", "VARIABLE_PREFIX", "builtin_environments",
           "name_variables", "variable_overrides"]

BUILTIN_ENVIRONMENTS: Final[Mapping[str, Mapping[str, Any]]] = {
    "development": {"logging": {"format": "console", "level": "debug"}},
    "production": {"logging": {"format": "json", "level": "info"},
                   "generation": {"isolation": "process"}},
    "test": {
        "calls": {"default_timeout_ms": 2000,
                  "retry": {"initial_delay_ms": 1, "max_delay_ms": 10},
                  "circuit_breaker": {"recovery_timeout_ms": 100}},
        "restarts": {"delay_base_ms": 10, "delay_max_ms": 100},
        "python_runtime": {"startup_timeout_ms": 10000},
        "stream_registry": {"default_timeout_ms": 10000, "idle_reader_timeout_ms": 1000},
        "supervision": {"backoff": {"min_ms": 1, "max_ms": 10}, "shutdown_timeout_ms": 500},
        "generation": {"stall_timeout_ms": 5000},
        "server": {"drain_timeout_ms": 1000},
    },
}
"""The overlays every configuration has, config/runtime.yaml's `environments` (a test
keeps the two equal). A file's overlay of the same name replaces the built-in one."""

VARIABLE_PREFIX: Final = "CORRAL_"
_NESTING: Final = "__"


def builtin_environments() -> dict[str, dict[str, Any]]:
    """A fresh copy of `BUILTIN_ENVIRONMENTS`, for a Struct default."""
    return copy.deepcopy({name: dict(overlay) for name, overlay in BUILTIN_ENVIRONMENTS.items()})


def variable_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str],
                                                            list[str]]:
    """The configuration keys set by variables `CORRAL_<SECTION>__<KEY>[__<KEY>...]`.

    A variable's name, lowercased after the prefix, splits on double underscores into
    the key's path (`CORRAL_GENERATION__PREFIX_CACHE__DISK_DIR` sets
    `generation.prefix_cache.disk_dir`); its value is read as YAML (`8`, `true`, `null`,
    `[a, b]`). `CORRAL_` variables without a double underscore (`CORRAL_ENV`,
    `CORRAL_CACHE_DIR`) are not keys and are left alone.

    Returns:
        The keys as nested mappings shaped like a file, each key's dotted path mapped to
        the variable that set it (for `name_variables`), and the errors of variables
        that set nothing (an empty part, an overlay, a value that is not YAML).
    """
    overrides: dict[str, Any] = {}
    paths: dict[str, str] = {}
    errors: list[str] = []
    for name in sorted(environ):
        if not name.startswith(VARIABLE_PREFIX) or _NESTING not in name:
            continue
        parts = name[len(VARIABLE_PREFIX):].lower().split(_NESTING)
        if not all(parts):
            errors.append(f"{name}: expected CORRAL_<SECTION>__<KEY>, with one double "
                          f"underscore between the parts of the key")
            continue
        if parts[0] == "environments":
            errors.append(f"{name}: overlays cannot be set by variables; use a file")
            continue
        try:
            value = yaml.safe_load(environ[name])
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            errors.append(f"{name}: invalid YAML value: {problem}")
            continue
        node = overrides
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
        paths[".".join(parts)] = name
    return overrides, paths, errors


def name_variables(errors: list[str], paths: Mapping[str, str]) -> list[str]:
    """Each error about a key a variable set, or about a section on its path, says so:
    `server.port: unknown field (set by CORRAL_SERVER__PORT)`."""
    named = []
    for error in errors:
        where = error.split(":", 1)[0]
        for path, variable in paths.items():
            if _on_path(where, path) or _on_path(path, where):
                error = f"{error} (set by {variable})"
                break
        named.append(error)
    return named


def _on_path(inner: str, outer: str) -> bool:
    """Whether `inner` is `outer` or a key (or item) inside it."""
    return inner == outer or inner.startswith((outer + ".", outer + "["))
