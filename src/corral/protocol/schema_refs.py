"""Local `$ref`s of a JSON Schema, before it becomes a grammar: refusing cycles that no
finite value satisfies, and keeping references resolvable when a schema is nested
inside another.

llguidance compiles `{"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}` into
a grammar whose only output is nothing, so a request with it got "" and finish "stop",
which is not JSON: `check_ref_cycles` refuses such a schema first, naming the cycle. A
recursive schema that can end (a tree whose children are optional, or an array that
may be empty) is productive and stays allowed. And a tool's `parameters` sit under
`arguments` in the tool-call grammar, where its root-relative pointers (`#/$defs/...`,
as Pydantic writes them) no longer resolve: `nest_refs` rewrites them to where the
schema now is.

Pure functions over builtins: no I/O, no llguidance. Only local references (`#`,
`#/...`) are followed; anything else is left to llguidance.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

from corral.protocol.errors import Code, EngineClientError

__all__ = ["check_ref_cycles", "has_local_refs", "nest_refs", "resolve_pointer"]

_ROOT = "#"
# The keywords whose values are schemas (by name, in a list, or one); any other value
# is data or a setting, never searched for references.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas", "$defs",
                          "definitions"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SCHEMA_ONE = frozenset({"items", "additionalProperties", "additionalItems", "not", "if",
                         "then", "else", "contains", "propertyNames",
                         "unevaluatedItems", "unevaluatedProperties"})
_DEFINITIONS = frozenset({"$defs", "definitions"})  # schemas defined, not used, here


def check_ref_cycles(schema: Any, field: str, where: str | None = None) -> None:
    """Refuse a schema in which a `$ref` cycle reachable from the root admits no finite
    value: every way through it refers back into it.

    Args:
        schema: the JSON Schema, as builtins.
        field: the request field the schema came from (`details.field`).
        where: the schema's place, for the message (`tools[0].function.parameters`);
            None: `field`.

    Raises:
        EngineClientError: GuidanceError naming the cycle, with `details.field` and
            `details.cycle` (the pointers, in order).
    """
    targets = _reachable_targets(schema)
    productive = {pointer: False for pointer in targets}
    changed = True
    while changed:  # least fixpoint: productive once some finite value is known
        changed = False
        for pointer, node in targets.items():
            if not productive[pointer] and _productive(node, productive):
                productive[pointer] = changed = True
    cycle = _cycle({p: sorted(_uses(targets[p]) & targets.keys())
                    for p in targets if not productive[p]})
    if cycle:
        path = " -> ".join([*cycle, cycle[0]])
        raise EngineClientError(
            Code.GUIDANCE_ERROR,
            f"{where or field}: the $ref cycle {path} admits no finite value (every way "
            "through it refers back into it); give it a way out, such as an optional "
            "property or an array that may be empty", {"field": field, "cycle": cycle})


def has_local_refs(schema: Any) -> bool:
    """Whether `schema` holds a `$ref` to a place in its own document."""
    return any(ref.startswith(_ROOT) for ref in _refs(schema, definitions=True))


def nest_refs(schema: Any, at: str) -> Any:
    """`schema` with every local `$ref` rewritten to point below `at` (a JSON pointer,
    `#/$defs/f0`): the copy to place at `at` in a larger document. Called on a part of
    the schema (one property), it rewrites that part alike."""
    if not isinstance(schema, dict):
        return schema
    nested: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {name: nest_refs(sub, at) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            value = [nest_refs(sub, at) for sub in value]
        elif key in _SCHEMA_ONE:
            value = nest_refs(value, at)
        elif key == "$ref" and isinstance(value, str) and value.startswith(_ROOT):
            value = at + value[len(_ROOT):]
        nested[key] = value
    return nested


def _uses(schema: Any) -> set[str]:
    """The local pointers `schema` refers to, outside the definitions it holds."""
    return {ref for ref in _refs(schema, definitions=False) if ref.startswith(_ROOT)}


def _refs(schema: Any, *, definitions: bool) -> Iterator[str]:
    """Every `$ref` of `schema` and its subschemas (those of `$defs` and `definitions`
    too, with `definitions`)."""
    if not isinstance(schema, dict):
        return
    ref = schema.get("$ref")
    if isinstance(ref, str):
        yield ref
    for key, value in schema.items():
        if key in _DEFINITIONS and not definitions:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            subschemas: list[Any] = list(value.values())
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            subschemas = value
        elif key in _SCHEMA_ONE:
            subschemas = [value]
        else:
            continue
        for sub in subschemas:
            yield from _refs(sub, definitions=definitions)


def _reachable_targets(schema: Any) -> dict[str, Any]:
    """The root and every local `$ref` target reachable from it, by pointer."""
    targets: dict[str, Any] = {_ROOT: schema}
    waiting = [_ROOT]
    while waiting:
        for ref in _uses(targets[waiting.pop()]):
            if ref in targets:
                continue
            target = resolve_pointer(schema, ref)
            if target is not None:  # an unresolvable one is llguidance's to report
                targets[ref] = target
                waiting.append(ref)
    return targets


def resolve_pointer(document: Any, pointer: str) -> Any:
    """The part of `document` a local `$ref` (`#`, `#/$defs/a`) points to, or None."""
    if not pointer.startswith(_ROOT):
        return None
    node = document
    for part in urllib.parse.unquote(pointer[len(_ROOT):]).split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def _productive(node: Any, known: dict[str, bool]) -> bool:
    """Whether some finite value satisfies `node`, the `$ref` targets in `known` taken
    as they are known so far. Only structure counts (required properties, least item
    counts, the combinators); any other keyword is taken as satisfiable."""
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        return True
    ref = node.get("$ref")
    if isinstance(ref, str) and not known.get(ref, True):
        return False
    all_of, any_of, one_of = (node.get(key) for key in ("allOf", "anyOf", "oneOf"))
    if isinstance(all_of, list) and not all(_productive(s, known) for s in all_of):
        return False
    for choices in (any_of, one_of):
        if isinstance(choices, list) and choices and not any(
                _productive(s, known) for s in choices):
            return False
    types = node.get("type")
    allowed = [types] if isinstance(types, str) else types
    if not isinstance(allowed, list):
        return True  # not an object or array is allowed, and some other value works
    return any(_object_productive(node, known) if kind == "object"
               else _array_productive(node, known) if kind == "array" else True
               for kind in allowed)


def _object_productive(node: dict[str, Any], known: dict[str, bool]) -> bool:
    properties = node.get("properties")
    required = node.get("required")
    if not isinstance(properties, dict) or not isinstance(required, list):
        return True
    return all(_productive(properties[name], known) for name in required
               if isinstance(name, str) and name in properties)


def _array_productive(node: dict[str, Any], known: dict[str, bool]) -> bool:
    least = node.get("minItems")
    if not isinstance(least, int) or least <= 0:
        return True
    prefix = node.get("prefixItems")
    prefix = prefix if isinstance(prefix, list) else []
    if not all(_productive(item, known) for item in prefix[:least]):
        return False
    return least <= len(prefix) or _productive(node.get("items", True), known)


def _cycle(graph: dict[str, list[str]]) -> list[str]:
    """A cycle of `graph` (pointers to the pointers they refer to), or []."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(pointer: str) -> list[str]:
        state[pointer] = 1
        path.append(pointer)
        for successor in graph.get(pointer, []):
            if successor not in graph:
                continue
            if state.get(successor) == 1:
                return path[path.index(successor):]
            if successor not in state and (found := visit(successor)):
                return found
        path.pop()
        state[pointer] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []
