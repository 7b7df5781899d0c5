"""corral.protocol.schema_bounds: what a schema leaves open gets a bound, what it states
stays, and `longest` bounds every value the bounded schema accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.protocol.schema_bounds import MAX_ITEMS, bounded, longest

CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"type": "object"}, {"type": "object", "additionalProperties": False}),
    ({"type": "object", "additionalProperties": True},
     {"type": "object", "additionalProperties": True}),
    ({"type": "string"}, {"type": "string", "maxLength": 10}),
    ({"type": "string", "maxLength": 500}, {"type": "string", "maxLength": 500}),
    ({"type": "string", "minLength": 20}, {"type": "string", "minLength": 20,
                                           "maxLength": 20}),
    ({"type": "string", "format": "date-time"},
     {"type": "string", "format": "date-time", "maxLength": 64}),
    ({"type": "array"}, {"type": "array", "maxItems": MAX_ITEMS}),
    ({"type": "integer", "minimum": 1}, {"type": "integer", "minimum": 1,
                                         "maximum": 10 ** 12}),
    ({"type": "number", "maximum": 5}, {"type": "number", "maximum": 5,
                                        "minimum": -(10 ** 12 - 1),
                                        "multipleOf": 1e-06}),
    ({"enum": ["a", "b"]}, {"enum": ["a", "b"]}),
    ({"not": {"type": "string"}}, {"not": {"type": "string"}}),
    ({}, {}),
]


@pytest.mark.parametrize(("schema", "expected"), CASES, ids=lambda v: json.dumps(v)[:40])
def test_open_keywords_get_bounds_and_stated_ones_stay(schema: dict[str, Any],
                                                       expected: dict[str, Any]) -> None:
    assert bounded(schema, 10) == expected
    assert schema == {k: v for k, v in expected.items() if k in schema}  # not changed


def test_nested_schemas_and_definitions_are_bounded() -> None:
    schema = {"type": "object", "properties": {"tags": {"type": "array",
                                                        "items": {"$ref": "#/$defs/t"}}},
              "$defs": {"t": {"type": "string"}}}
    out = bounded(schema, 4)
    assert out["$defs"]["t"] == {"type": "string", "maxLength": 4}
    assert out["properties"]["tags"]["maxItems"] == MAX_ITEMS
    assert longest(out) == 2 + len('"tags":') + 2 + MAX_ITEMS * (2 + 12 * 4) + MAX_ITEMS - 1


@pytest.mark.parametrize("schema", [
    {}, {"type": "object", "additionalProperties": True},
    {"$ref": "#/$defs/n", "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}},
])
def test_longest_is_none_where_nothing_bounds_a_value(schema: dict[str, Any]) -> None:
    assert longest(bounded(schema, 8)) is None


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-999, 999),
                    st.text(max_size=8))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), SCALARS, max_size=3))
def test_longest_bounds_every_value_written(value: dict[str, Any]) -> None:
    schema = bounded({"type": "object", "properties": {
        "a": {"type": ["string", "integer", "null", "boolean"]},
        "b": {"type": ["string", "integer", "null", "boolean"]},
        "c": {"type": ["string", "integer", "null", "boolean"]}}}, 8)
    size = longest(schema)
    assert size is not None
    assert len(json.dumps(value, separators=(",", ":")).encode()) <= size
