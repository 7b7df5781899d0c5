"""Writing and compiling grammars: the llguidance grammar of a `response_format` (or
of a Lark text), and whether llguidance accepts a grammar, decided once per string.

`response_format_grammar` turns OpenAI's shapes (`corral.protocol.grammar`) into the
grammar an `EngineSequence` carries. `check_grammar` compiles a grammar without a
tokenizer and names what is wrong as GuidanceError; its verdicts are kept per grammar
string in a bounded LRU. The runtime calls both in a worker thread before admission,
never on an engine's step path. No MLX here; llguidance is imported on first use, so
processes that never constrain a request never load it.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from corral.protocol.grammar import (
    JsonObjectFormat,
    JsonSchemaFormat,
    ResponseFormat,
    guidance_error,
)
from corral.protocol.schema_refs import check_ref_cycles

__all__ = ["GRAMMAR_CACHE_SIZE", "check_grammar", "compile_problem", "json_object_grammar",
           "json_schema_grammar", "lark_grammar", "response_format_grammar"]

GRAMMAR_CACHE_SIZE: Final = 256
"""Grammar strings whose verdict `check_grammar` remembers (and, engine side, compiled
matchers per model)."""


def check_grammar(grammar: str, field: str = "response_format") -> None:
    """Refuse a grammar llguidance cannot compile. Compiles on the first call for a
    grammar string (up to a second for extreme grammars; call it off the event loop),
    then answers from the cache.

    Raises:
        EngineClientError: GuidanceError naming the problem, as llguidance states it,
            and `field`, the request field the grammar came from.
    """
    problem = compile_problem(grammar)
    if problem:
        raise guidance_error(f"{field}: the grammar cannot be compiled: {problem}", field)


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def compile_problem(grammar: str) -> str:
    """What llguidance finds wrong with a grammar, or "" when it compiles; remembered
    for the last `GRAMMAR_CACHE_SIZE` grammar strings (`compile_problem.cache_info()`)."""
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(grammar).strip()


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar a response format asks for, or None for free text.

    Raises:
        EngineClientError: GuidanceError when the schema cannot be serialized, or has a
            `$ref` cycle that admits no finite value (`check_ref_cycles`).
    """
    if isinstance(response_format, JsonObjectFormat):
        return json_object_grammar()
    if isinstance(response_format, JsonSchemaFormat):
        spec = response_format.json_schema
        check_ref_cycles(spec.schema, "response_format", "response_format.json_schema.schema")
        return json_schema_grammar(spec.schema, strict=bool(spec.strict))
    return None


def json_schema_grammar(schema: dict[str, Any], *, strict: bool = True) -> str:
    """The grammar of JSON values that `schema` accepts, written compactly.

    Raises:
        EngineClientError: GuidanceError when the schema cannot be serialized (the
            schema's meaning is checked by `check_grammar`).
    """
    from llguidance import LLMatcher

    try:
        # Compact JSON: flexible whitespace would let a model pad its output with
        # whitespace until max_tokens (the classic failure of constrained JSON), and
        # costs tokens. The schema's own "x-guidance" options win over these defaults.
        return LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "lenient": not strict})
    except (ValueError, TypeError) as exc:
        raise guidance_error(f"response_format: json_schema: {exc}") from None


def json_object_grammar() -> str:
    """The grammar of any JSON object, written compactly."""
    return json_schema_grammar({"type": "object"})


def lark_grammar(text: str) -> str:
    """The grammar of a Lark grammar text (llguidance's dialect: `start:` is the top)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(text)
