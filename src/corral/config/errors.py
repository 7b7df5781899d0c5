"""Configuration errors: `ConfigError`, and every problem of a config document named by
its path.

msgspec stops at the first problem; `every_error` checks key by key so one run of
`corral config check` lists them all. The words are those of the one translator,
`corral.protocol.validation.explain`, which JSON-RPC and HTTP use too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from corral.config.schema import RuntimeConfig
from corral.protocol.validation import explain


class ConfigError(Exception):
    """The configuration cannot be used.

    Attributes:
        errors: one line per problem, each starting with the path of the key it is
            about, e.g. `json_rpc.retry.jitter: expected <= 1`.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def every_error(data: Any, section: type[msgspec.Struct], path: str) -> list[str]:
    """Every problem in `data` for `section`, not only the first that msgspec meets:
    each key is checked on its own (sections key by key), then the whole section for
    the checks that span keys."""
    if not isinstance(data, Mapping):
        return section_errors(data, section, path)
    fields = {f.name: f.type for f in msgspec.structs.fields(section)}
    errors: list[str] = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            errors.append(f"{where}: unknown field")
            continue
        kind = fields[key]
        nested = isinstance(kind, type) and issubclass(kind, msgspec.Struct)
        if nested and isinstance(value, Mapping):
            errors.extend(every_error(value, kind, where))
        else:
            errors.extend(section_errors({key: value}, section, path))
    return errors or section_errors(data, section, path)


def section_errors(data: Any, section: type[msgspec.Struct], path: str) -> list[str]:
    try:
        msgspec.convert(data, section)
    except msgspec.ValidationError as exc:
        return [translate(exc, path)]
    return []


def translate(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """One line for `exc`: the path of the key it is about, under `prefix` (the path of
    the section that was decoded), and what is wrong with it."""
    path, message = explain(exc, prefix, root=RuntimeConfig)
    return f"{path or '(root)'}: {message}"


def describe_kind(value: Any) -> str:
    """What YAML calls the kind of `value`: mapping, list, or its Python type."""
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__
