"""Bounds on what a JSON Schema leaves open, so that a value the model is made to write
always ends.

A schema that leaves a string's length, an array's length, a number's digits or an
object's keys open lets a model (a weak one above all) write one value until
`max_tokens`: a forced tool call then never closes and never parses. `bounded` writes
bounds in where the schema states none: an object takes no properties beyond those it
lists unless the schema allows more explicitly (`additionalProperties`,
`patternProperties`), a string at most `max_length` characters, an array at most
`MAX_ITEMS` items, a number at most `MAX_DIGITS` digits before the point and
`FRACTION_DIGITS` after it. A bound the schema states is kept. `longest` is the most
bytes a value of a schema can take, written compactly, or None when nothing bounds it
(properties the schema allows explicitly, a recursive reference, any value at all).

Pure functions over builtins, like `schema_refs`: no I/O, no llguidance. Subschemas
under `not`, `if`, `contains` and `propertyNames` are left as they are: a bound there
would change what they exclude or test.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Final

from corral.protocol.schema_refs import resolve_pointer

__all__ = ["FRACTION_DIGITS", "MAX_DIGITS", "MAX_ITEMS", "bounded", "longest"]

MAX_ITEMS: Final = 8
"""Items of an array whose schema sets no `maxItems`."""

MAX_DIGITS: Final = 12
"""Digits before the point of a number whose schema sets no `maximum` (or `minimum`)."""

FRACTION_DIGITS: Final = 6
"""Digits after the point of a number whose schema sets no `multipleOf`."""

# A schema's own format (`format`, `pattern`) may need more room than a tight budget
# leaves; a bound never makes it unsatisfiable below this.
_SHAPED_MIN_LENGTH: Final = 64
# The most bytes one character of a JSON string can take written out: a character
# beyond the Basic Multilingual Plane escaped as a surrogate pair (`\ud800\udc00`).
_BYTES_PER_CHAR: Final = 12
_LIMIT: Final = 10 ** MAX_DIGITS - 1
_STEP: Final = float(Decimal(1).scaleb(-FRACTION_DIGITS))
_SCHEMA_MAPS: Final = frozenset({"properties", "patternProperties", "dependentSchemas",
                                 "$defs", "definitions"})
_SCHEMA_LISTS: Final = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_ONE: Final = frozenset({"items", "additionalProperties", "additionalItems",
                                "then", "else"})
_COMBINATORS: Final = ("anyOf", "oneOf", "allOf", "$ref")
_TYPED_BY: Final = {"properties": "object", "additionalProperties": "object",
                    "items": "array", "prefixItems": "array", "maxLength": "string",
                    "minLength": "string", "pattern": "string", "format": "string"}
_ALL_TYPES: Final = ("object", "array", "string", "integer", "number", "boolean", "null")


def bounded(schema: Any, max_length: int) -> Any:
    """`schema` with a bound wherever it leaves a value's size open (see the module's
    docstring); strings get at most `max_length` characters. A new schema: `schema`
    itself is never changed."""
    if isinstance(schema, list):
        return [bounded(item, max_length) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: bounded(sub, max_length) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [bounded(sub, max_length) for sub in value]
        elif key in _SCHEMA_ONE and isinstance(value, dict | list):
            out[key] = bounded(value, max_length)
        else:
            out[key] = value
    if "const" in out or "enum" in out:
        return out
    types = _types(out)
    if "object" in types and not ({"additionalProperties", "patternProperties",
                                   "unevaluatedProperties"} & out.keys()):
        out["additionalProperties"] = False
    if "string" in types and "maxLength" not in out:
        shaped = "format" in out or "pattern" in out
        least = max(_int(out.get("minLength")), _SHAPED_MIN_LENGTH if shaped else 0)
        out["maxLength"] = max(max_length, least)
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(MAX_ITEMS, _int(out.get("minItems")))
    if types & {"integer", "number"}:
        _bound_numbers(out, "number" in types)
    return out


def _types(schema: dict[str, Any]) -> set[str]:
    """The types a schema node constrains itself (not through a combinator)."""
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    implied = {_TYPED_BY[key] for key in schema if key in _TYPED_BY}
    if implied or any(key in schema for key in _COMBINATORS):
        return implied
    return set()  # any value: nothing here to bound it by


def _bound_numbers(schema: dict[str, Any], fractions: bool) -> None:
    low = _number(schema.get("minimum"), schema.get("exclusiveMinimum"))
    high = _number(schema.get("maximum"), schema.get("exclusiveMaximum"))
    if high is None:
        schema["maximum"] = max(_LIMIT, int(low) + _LIMIT) if low is not None else _LIMIT
    if low is None:
        schema["minimum"] = min(-_LIMIT, int(high) - _LIMIT) if high is not None else -_LIMIT
    if fractions and "multipleOf" not in schema:
        schema["multipleOf"] = _STEP


def longest(schema: Any, document: Any = None, seen: frozenset[str] = frozenset()
            ) -> int | None:
    """The most bytes a value `schema` accepts takes written as compact JSON, or None
    when nothing bounds it. `document` is the schema its local `$ref`s point into
    (`schema` itself when None)."""
    if document is None:
        document = schema
    if schema is False:
        return 0
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return _size(schema["const"])
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return max(_size(value) for value in schema["enum"])
    estimates: list[int | None] = []
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#") or ref in seen:
            estimates.append(None)
        else:
            estimates.append(longest(resolve_pointer(document, ref), document, seen | {ref}))
    for key in ("anyOf", "oneOf"):
        members = schema.get(key)
        if isinstance(members, list) and members:
            each = [longest(member, document, seen) for member in members]
            estimates.append(None if None in each else max(v for v in each if v is not None))
    every = schema.get("allOf")
    if isinstance(every, list):
        estimates.extend(longest(member, document, seen) for member in every)
    types = _types(schema)
    if types or not estimates:
        estimates.append(_own_longest(schema, types or set(_ALL_TYPES), document, seen))
    # A value must satisfy each: the tightest known bound holds.
    known = [value for value in estimates if value is not None]
    return min(known) if known else None


def _own_longest(schema: dict[str, Any], types: set[str], document: Any,
                 seen: frozenset[str]) -> int | None:
    sizes: list[int | None] = []
    for kind in types:
        if kind == "null":
            sizes.append(4)
        elif kind == "boolean":
            sizes.append(5)
        elif kind == "string":
            most = schema.get("maxLength")
            sizes.append(2 + _BYTES_PER_CHAR * most if isinstance(most, int) else None)
        elif kind in ("integer", "number"):
            sizes.append(_number_longest(schema, kind == "number"))
        elif kind == "array":
            sizes.append(_array_longest(schema, document, seen))
        elif kind == "object":
            sizes.append(_object_longest(schema, document, seen))
    return None if None in sizes or not sizes else max(s for s in sizes if s is not None)


def _number_longest(schema: dict[str, Any], fractions: bool) -> int | None:
    low = _number(schema.get("minimum"), schema.get("exclusiveMinimum"))
    high = _number(schema.get("maximum"), schema.get("exclusiveMaximum"))
    if low is None or high is None:
        return None
    digits = max(len(str(int(abs(low)))), len(str(int(abs(high))))) + 1  # and a sign
    if not fractions:
        return digits
    step = schema.get("multipleOf")
    if not isinstance(step, int | float) or isinstance(step, bool) or step <= 0:
        return None
    exponent = Decimal(str(step)).normalize().as_tuple().exponent
    decimals = max(0, -exponent) if isinstance(exponent, int) else 0
    return digits + 1 + decimals


def _array_longest(schema: dict[str, Any], document: Any, seen: frozenset[str]
                   ) -> int | None:
    most = schema.get("maxItems")
    if not isinstance(most, int):
        return None
    if most == 0:
        return 2
    prefix = schema.get("prefixItems")
    prefix = prefix if isinstance(prefix, list) else []
    sizes = [longest(item, document, seen) for item in prefix[:most]]
    rest = most - len(sizes)
    if rest > 0:
        item = schema.get("items", True)
        size = longest(item, document, seen)
        sizes.extend([size] * rest)
    if None in sizes:
        return None
    return 2 + sum(s for s in sizes if s is not None) + most - 1


def _object_longest(schema: dict[str, Any], document: Any, seen: frozenset[str]
                    ) -> int | None:
    if schema.get("additionalProperties", True) is not False or "patternProperties" in schema:
        return None
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return None
    total = 2 + max(0, len(properties) - 1)
    for name, value in properties.items():
        size = longest(value, document, seen)
        if size is None:
            return None
        total += _size(name) + 1 + size
    return total


def _number(inclusive: Any, exclusive: Any) -> float | None:
    for value in (inclusive, exclusive):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
