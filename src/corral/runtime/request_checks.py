"""The checks of a request's shape and token ids made before it reaches a model: a
prompt no model could take, text no tokenizer may see, ids outside a vocabulary.

Pure functions: each raises InvalidParams naming the field, and never touches an actor.
"""

from __future__ import annotations

from typing import Any

import msgspec

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import (
    MAX_TEMPLATE_KWARGS_BYTES,
    RESERVED_TEMPLATE_KWARGS,
    GenerateParams,
    ModelInfo,
)

__all__ = ["check_prompt_shape", "check_template_kwargs", "check_text", "check_token_ids"]


def check_prompt_shape(request: GenerateParams) -> None:
    """Raise InvalidParams for a prompt no model could take: checked before anything
    else, so an open circuit or a fallback never answers a malformed request."""
    if (request.prompt is None) == (request.messages is None):
        raise EngineClientError(Code.INVALID_PARAMS,
                                "prompt: give exactly one of prompt and messages",
                                {"field": "prompt"})
    if request.messages is not None:
        if not request.messages:
            raise EngineClientError(Code.INVALID_PARAMS, "messages: expected at least one",
                                    {"field": "messages"})
        for index, message in enumerate(request.messages):
            check_text(f"messages[{index}].content", message.content)
    elif isinstance(request.prompt, str):
        check_text("prompt", request.prompt)
        if not request.prompt:
            raise EngineClientError(Code.INVALID_PARAMS, "prompt: expected a non-empty string",
                                    {"field": "prompt"})
    if request.generated and (request.messages is not None or request.tools):
        raise EngineClientError(Code.INVALID_PARAMS, "generated: continues a prompt, "
                                "without chat messages or tools", {"field": "generated"})
    if request.chat_template_kwargs:
        if request.messages is None:
            raise EngineClientError(Code.INVALID_PARAMS, "chat_template_kwargs: only chat "
                                    "messages are rendered by a chat template",
                                    {"field": "chat_template_kwargs"})
        check_template_kwargs(request.chat_template_kwargs)


def check_template_kwargs(kwargs: dict[str, Any]) -> None:
    """Raise InvalidParams for chat template variables that are not JSON values, take
    more than `MAX_TEMPLATE_KWARGS_BYTES` as JSON, or name what the rendering sets
    itself (`RESERVED_TEMPLATE_KWARGS`). A value built in Python must be JSON too: it
    crosses to a worker process, and the template reads it as JSON data."""
    field = "chat_template_kwargs"
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise EngineClientError(Code.INVALID_PARAMS, f"{field}.{reserved[0]}: set by the "
                                "rendering itself, not a template variable",
                                {"field": f"{field}.{reserved[0]}"})
    try:
        size = len(msgspec.json.encode(kwargs))
    except (TypeError, ValueError, msgspec.EncodeError):
        raise EngineClientError(Code.INVALID_PARAMS, f"{field}: expected JSON values",
                                {"field": field}) from None
    if size > MAX_TEMPLATE_KWARGS_BYTES:
        raise EngineClientError(Code.INVALID_PARAMS, f"{field}: expected at most "
                                f"{MAX_TEMPLATE_KWARGS_BYTES} bytes as JSON, got {size}",
                                {"field": field})


def check_token_ids(field: str, ids: list[int], info: ModelInfo | None) -> None:
    """Raise InvalidParams for token ids the model's vocabulary does not have."""
    if info is not None and any(i >= info.vocab_size for i in ids):
        raise EngineClientError(Code.INVALID_PARAMS,
                                f"{field}: token ids must be < {info.vocab_size}",
                                {"field": field})


def check_text(field: str, text: str) -> None:
    """Raise InvalidParams for text that no tokenizer may see (NUL bytes)."""
    if "\x00" in text:
        raise EngineClientError(Code.INVALID_PARAMS, f"{field}: NUL bytes are not allowed",
                                {"field": field})
