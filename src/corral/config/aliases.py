"""Seed-name aliases: keys of the format corral started from (`json_rpc.retry`,
`python_runtime.max_restarts`) and the keys they set now.

A file may use either name; errors about a key set through its alias name the alias.
Pure mapping work: no reading, no validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

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


def dealias(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
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


def as_written(error: str, renames: Mapping[str, str]) -> str:
    """An error about a key the file set through its alias names the alias."""
    for key, alias in renames.items():
        if error.startswith((f"{key}:", f"{key}.", f"{key}[")):
            return alias + error[len(key):]
    return error
