"""The checks of a request's shape and token ids made before it reaches a model: a
prompt no model could take, text no tokenizer may see, ids outside a vocabulary.

Pure functions: each raises InvalidParams naming the field, and never touches an actor.
"""

from __future__ import annotations

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import GenerateParams, ModelInfo

__all__ = ["check_prompt_shape", "check_text", "check_token_ids"]


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
