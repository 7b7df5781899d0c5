"""Structured output as data: OpenAI's `response_format` shapes and the llguidance
grammars they become.

A grammar is llguidance's serialized form (a string), the one thing that crosses to an
engine, in `SamplingParams.grammar`; compiling one is `corral.engine.grammar`'s job.
No MLX here; llguidance is imported on first use (to write a grammar), so processes that
never constrain a request never load it.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.schema_refs import check_ref_cycles

__all__ = ["JsonObjectFormat", "JsonSchema", "JsonSchemaFormat", "ResponseFormat",
           "TextFormat", "json_object_grammar", "json_schema_grammar", "lark_grammar",
           "response_format_grammar"]

class TextFormat(msgspec.Struct, frozen=True, tag_field="type", tag="text",
                 forbid_unknown_fields=True):
    """Free text: no grammar (OpenAI's default)."""


class JsonObjectFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_object",
                       forbid_unknown_fields=True):
    """Any JSON object (OpenAI's "JSON mode")."""


class JsonSchema(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's `json_schema` object.

    `strict` true: a schema keyword llguidance does not implement is a GuidanceError;
    otherwise such keywords are ignored (best effort, as OpenAI's non-strict mode).
    The output always follows what is implemented.
    """

    name: Annotated[str, msgspec.Meta(max_length=64)]
    schema: dict[str, Any] = {}
    strict: bool | None = None
    description: str | None = None


class JsonSchemaFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_schema",
                       forbid_unknown_fields=True):
    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat
"""OpenAI's `response_format`, told apart by its `type`."""


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


def guidance_error(message: str, field: str = "response_format") -> EngineClientError:
    """GuidanceError about the request field `field`."""
    return EngineClientError(Code.GUIDANCE_ERROR, message, {"field": field})
