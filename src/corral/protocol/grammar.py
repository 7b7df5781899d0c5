"""Structured output as data: OpenAI's `response_format` shapes, and the error a
grammar's problems are.

The grammars they become (llguidance's serialized form, a string, which crosses to an
engine in `EngineSequence.grammar`) are written and compiled by `corral.engine.grammar`.
Data only: no llguidance here.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from corral.protocol.errors import Code, EngineClientError

__all__ = ["JsonObjectFormat", "JsonSchema", "JsonSchemaFormat", "ResponseFormat",
           "TextFormat", "guidance_error"]


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


def guidance_error(message: str, field: str = "response_format") -> EngineClientError:
    """GuidanceError about the request field `field`."""
    return EngineClientError(Code.GUIDANCE_ERROR, message, {"field": field})
