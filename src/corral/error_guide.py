"""The generated parts of docs/error-handling.md: the error code table and the tables of
the retry, breaker and restart configuration keys.

`corral docs errors` rewrites them in place between their markers (`--check` only
compares). The code table comes from `corral.protocol.errors.ERROR_TABLE`, the key
tables from the comments of config/runtime.yaml, so neither can drift from the code: a
test fails when the guide differs from what this module renders. Reads and writes only
the files it is given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from corral.protocol.errors import CLIENT_ERROR_CODES, ERROR_TABLE

__all__ = ["CONFIG_SECTIONS", "code_table", "config_keys", "config_table", "refresh",
           "render"]

_TOOLKIT: Final[dict[str, str]] = {
    "calls.retry": "`RetryPolicy(...)` / `retry(...)`",
    "calls.retry.budget": "`RetryBudget(max_tokens=max_retry_tokens, token_ratio)`",
    "calls.circuit_breaker": "`circuit_breaker(...)` / `CircuitBreakerConfig(...)`",
    "restarts": "",
    "supervision.backoff": "",
}
CONFIG_SECTIONS: Final[tuple[str, ...]] = tuple(_TOOLKIT)
"""The sections of config/runtime.yaml the guide lists, key by key."""

_LINE: Final = re.compile(
    r"^(?P<indent> *)(?P<key>[a-z_]+):(?P<value>[^#]*?)\s*(?:#\s?(?P<doc>.*))?$")
_CONTINUATION: Final = re.compile(r"^ +#\s?(?P<doc>.*)$")
_ITEM: Final = re.compile(r"^ +- (?P<item>\S+)\s*$")
_BEGIN = "<!-- BEGIN GENERATED: {name} (corral docs errors) -->"
_END = "<!-- END GENERATED: {name} -->"


def _retryable(value: bool | None) -> str:
    return "by cause" if value is None else ("yes" if value else "no")


def code_table() -> str:
    """Every code of the error table as a Markdown table."""
    rows = ["| code | JSON-RPC | HTTP | retryable | category | what to do |",
            "|---|---|---|---|---|---|"]
    for spec in ERROR_TABLE.values():
        blame = " (client error)" if spec.code in CLIENT_ERROR_CODES else ""
        rows.append(f"| `{spec.code.value}` | {spec.jsonrpc} | {spec.http} | "
                    f"{_retryable(spec.retryable)} | {spec.category.value}{blame} | "
                    f"{spec.suggestion} |")
    return "\n".join(rows)


def config_keys(yaml_text: str) -> dict[str, list[tuple[str, str, str]]]:
    """(key, default, comment) of every leaf key, by section path (`calls.retry`)."""
    found: dict[str, list[list[str]]] = {}
    stack: list[tuple[int, str]] = []
    last: list[str] | None = None
    for line in yaml_text.splitlines():
        continuation = _CONTINUATION.match(line)
        if continuation and last is not None and len(line) - len(line.lstrip()) > 20:
            last[2] = f"{last[2]} {continuation['doc'].strip()}".strip()
            continue
        item = _ITEM.match(line)
        if item and last is not None:  # a list value: `key:  # doc` then `- item` lines
            last[1] = f"{last[1]}, {item['item']}" if last[1] else item["item"]
            continue
        match = _LINE.match(line)
        if match is None:
            last = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, value = match["key"], match["value"].strip()
        if not value and (indent == 0 or not match["doc"]):
            stack.append((indent, key))
            last = None
            continue
        section = ".".join(name for _, name in stack)
        last = [key, value, (match["doc"] or "").strip()]
        found.setdefault(section, []).append(last)
    return {section: [(k, v, d) for k, v, d in rows] for section, rows in found.items()}


def config_table(yaml_text: str) -> str:
    """The keys of `CONFIG_SECTIONS` as Markdown tables, one per section."""
    keys = config_keys(yaml_text)
    parts = []
    for section in CONFIG_SECTIONS:
        toolkit = _TOOLKIT[section]
        heading = f"`{section}`" + (f", the same fields as {toolkit}" if toolkit else "")
        rows = [f"#### {heading}", "", "| key | default | meaning |", "|---|---|---|"]
        rows += [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in keys[section]]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def _replace(text: str, name: str, body: str) -> str:
    begin, end = _BEGIN.format(name=name), _END.format(name=name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the guide lacks the markers {begin!r} ... {end!r}")
    return f"{text[:start]}{begin}\n{body}\n{text[stop:]}"


def render(guide: str, yaml_text: str) -> str:
    """`guide` with its generated blocks ("codes", "config") rendered afresh."""
    return _replace(_replace(guide, "codes", code_table()), "config", config_table(yaml_text))


def refresh(guide_path: Path, config_path: Path, *, check: bool) -> bool:
    """Render the guide's generated blocks; write them unless `check`.

    Returns:
        Whether the guide was already up to date.
    """
    guide = guide_path.read_text(encoding="utf-8")
    fresh = render(guide, config_path.read_text(encoding="utf-8"))
    if fresh != guide and not check:
        guide_path.write_text(fresh, encoding="utf-8")
    return fresh == guide
