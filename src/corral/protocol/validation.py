"""msgspec validation errors in words: the one translator every boundary uses.

The configuration loader, JSON-RPC and the HTTP API all decode untrusted data with
msgspec; each turns its `ValidationError` into a path and a message here, in one
dialect: `json_rpc.retry.jitter: expected <= 1`, `prompt: required field missing`,
`promt: unknown field`, `stop[1]: expected str, got int`, `logging.level: expected one
of 'debug', 'info', got 'loud'`. Pure string work on msgspec's message: no I/O, no
decoding of its own.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
import msgspec.inspect


class FieldError(ValueError):
    """A cross-field check failed in a Struct's `__post_init__`; `field` is relative to
    the Struct.

    msgspec reports such errors at the Struct's path and keeps the exception as the
    cause, so `explain` can append `field` and name the exact key.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_AT_PATH: Final = re.compile(r"(?s)(?P<text>.*) - at `\$\.?(?P<path>.*)`")
_FIELD: Final = re.compile(
    r"^Object (?P<what>contains unknown|missing required) field `(?P<key>[^`]*)`$"
)
_BOUND: Final = re.compile(
    r"^Expected `[^`]*` (?P<length>of length )?(?P<op>[<>]=?) (?P<number>\S+)$"
)
_TYPE: Final = re.compile(r"^Expected `(?P<expected>[^`]*)`, got `(?P<got>[^`]*)`$")
_ENUM: Final = re.compile(r"^Invalid enum value (?P<value>.*)$")


def explain(exc: msgspec.ValidationError, prefix: str = "", *,
            root: Any = None) -> tuple[str, str]:
    """The path of the value `exc` is about and what is wrong with it.

    Args:
        exc: raised by msgspec while decoding or converting.
        prefix: the path of the value that was decoded, when it is part of a larger
            document (a config section); the result's path starts with it.
        root: the type the whole document decodes into (from `prefix` down), to name the
            allowed values of a Literal or an enum; without it a bad one is only "invalid
            value".

    Returns:
        (path, message): "" for the path when the error is about the whole value.
    """
    message, path = str(exc), ""
    if match := _AT_PATH.fullmatch(message):
        message, path = match["text"], match["path"]
    path = _join(prefix, path)
    cause = exc.__cause__
    if isinstance(cause, FieldError):
        return _join(path, cause.field), str(cause)
    if field := _FIELD.match(message):
        path = _join(path, field["key"])
        message = ("unknown field" if field["what"] == "contains unknown"
                   else "required field missing")
    elif bound := _BOUND.match(message):
        length = "length " if bound["length"] else ""
        message = f"expected {length}{bound['op']} {_number(bound['number'])}"
    elif kinds := _TYPE.match(message):
        message = f"expected {kinds['expected']}, got {kinds['got']}"
    elif enum := _ENUM.match(message):
        choices = _choices(root, path) if root is not None else ()
        message = (f"expected one of {', '.join(map(repr, choices))}, got {enum['value']}"
                   if choices else f"invalid value {enum['value']}")
    else:
        message = lower_first(message.replace("`", ""))
    return path, message


def describe(exc: msgspec.ValidationError, *, root: Any = None) -> str:
    """`explain` as one line: `path: message`, or the message alone for the whole value."""
    path, message = explain(exc, root=root)
    return f"{path}: {message}" if path else message


def lower_first(text: str) -> str:
    """msgspec's sentence as the rest of ours: "Expected" → "expected", "JSON" stays."""
    return text if text[1:2].isupper() else text[:1].lower() + text[1:]


def _join(path: str, field: str) -> str:
    if not path:
        return field
    if not field:
        return path
    return f"{path}{field}" if field.startswith("[") else f"{path}.{field}"


def _number(text: str) -> str:
    """`1.0` as `1`, so a bound reads as it was configured."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def _choices(root: Any, path: str) -> tuple[Any, ...]:
    """The values a Literal or enum at `path` under `root` allows, or () if the path
    does not lead to one."""
    node: msgspec.inspect.Type = msgspec.inspect.type_info(root)
    for segment in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        node = _unwrap(node)
        if segment.startswith("["):
            if not isinstance(node, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
                return ()
            node = node.item_type
        elif isinstance(node, msgspec.inspect.StructType):
            fields = {field.encode_name: field.type for field in node.fields}
            if segment not in fields:
                return ()
            node = fields[segment]
        else:
            return ()
    node = _unwrap(node)
    if isinstance(node, msgspec.inspect.LiteralType):
        return tuple(node.values)
    if isinstance(node, msgspec.inspect.EnumType):
        return tuple(member.value for member in node.cls)
    return ()


def _unwrap(node: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The non-null member of an optional type."""
    if isinstance(node, msgspec.inspect.UnionType):
        members = [t for t in node.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(members) == 1:
            return members[0]
    return node
