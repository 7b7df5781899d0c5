"""Loading the configuration: a YAML file, an `environments.<name>` overlay chosen by
`CORRAL_ENV`, `CORRAL_<SECTION>__<KEY>` variables, and caller overrides, merged in that
order and decoded into a `RuntimeConfig`.

Every other module receives a `RuntimeConfig`, never a dict. A bad key or value is a
`ConfigError` naming its path. This module reads one file and never starts anything,
opens a socket, or configures logging.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec
import yaml

from corral.config.aliases import as_written, dealias
from corral.config.environment import builtin_environments, name_variables, variable_overrides
from corral.config.errors import ConfigError, describe_kind, every_error, translate
from corral.config.schema import RuntimeConfig


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
    prefix `environments.<name>.`. The built-in overlays (`BUILTIN_ENVIRONMENTS`) are
    kept beside the file's, and checked only when one is chosen.

    Raises:
        ConfigError: listing every problem found, each named by its path.
    """
    return _validate(data, check_overlays=True)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RuntimeConfig:
    """Read, merge and validate the runtime configuration.

    The file is validated as written (its overlays included), then the overlay
    `environments[env]` (the file's, else the built-in one of that name) is deep-merged
    into it, then the keys set by `CORRAL_<SECTION>__<KEY>` variables, then `overrides`,
    and the result is decoded.

    Args:
        path: a YAML file; None uses the Struct defaults alone.
        env: the overlay to apply; None reads `CORRAL_ENV`, and an empty string (or an
            unset variable) applies none.
        overrides: values merged last, shaped like the file (nested mappings).
        environ: the variables to read `CORRAL_ENV` and keys from; None is `os.environ`.

    Returns:
        The resolved configuration, with the overlays kept in `environments`.

    Raises:
        ConfigError: the file cannot be read or parsed, the environment is not defined,
            a variable names no key or holds a bad value (the error names the variable),
            or a key or value is invalid.
    """
    environ = os.environ if environ is None else environ
    data = _read_yaml(path) if path is not None else {}
    config = config_from_mapping(data)
    source = ""
    if env is None:
        env, source = environ.get("CORRAL_ENV"), " (set by CORRAL_ENV)"
    variables, paths, errors = variable_overrides(environ)
    if errors:
        raise ConfigError(errors)
    if not env and not variables and not overrides:
        return config
    if env:
        if env not in config.environments:
            known = ", ".join(sorted(config.environments)) or "none"
            raise ConfigError([f"environments.{env}: unknown environment{source}; known: {known}"])
        data = deep_merge(dealias(data)[0], dealias(config.environments[env])[0])
    for layer in (variables, overrides):
        # Aliases name the same keys: merged under one name, or they would clash.
        if layer:
            data = deep_merge(dealias(data)[0], dealias(layer)[0])
    # The overlays were checked against the file as written; checking them again on top
    # of the chosen one would blame them for combinations nobody configured.
    try:
        return _validate(data, check_overlays=False)
    except ConfigError as exc:
        raise ConfigError(name_variables(exc.errors, paths)) from None


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
        raise ConfigError([f"{name}: expected a mapping at the top level, "
                           f"got {describe_kind(data)}"])
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
    return msgspec.structs.replace(config, environments=builtin_environments() | environments)


def _check_environments(raw: Any, errors: list[str]) -> dict[str, dict[str, Any]]:
    """The overlays that are well-formed mappings; problems with the others go to errors."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errors.append("environments: expected a mapping of name to overlay, got "
                      f"{describe_kind(raw)}")
        return {}
    environments: dict[str, dict[str, Any]] = {}
    for name, overlay in raw.items():
        if not isinstance(name, str) or not name:
            errors.append(f"environments: expected a non-empty string name, got {name!r}")
        elif overlay is None:
            # A YAML key whose body is all commented out: an empty overlay, not an error.
            environments[name] = {}
        elif not isinstance(overlay, Mapping):
            errors.append(f"environments.{name}: expected a mapping, got {describe_kind(overlay)}")
        elif "environments" in overlay:
            errors.append(f"environments.{name}.environments: overlays cannot nest")
        else:
            environments[name] = dict(overlay)
    return environments


def _decode(data: Mapping[str, Any]) -> tuple[RuntimeConfig | None, list[str]]:
    data, renames, clashes = dealias(data)
    try:
        config = msgspec.convert(data, RuntimeConfig)
    except msgspec.ValidationError as exc:
        errors = every_error(data, RuntimeConfig, "") or [translate(exc)]
        return None, clashes + [as_written(error, renames) for error in errors]
    return (None, clashes) if clashes else (config, [])
