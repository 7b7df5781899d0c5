"""How long a prompt and a completion may be: the config's limits, else the model's.

Pure functions of the request and the model's `ModelInfo`: they raise InvalidParams
naming the limit and the key that sets it, and never touch an actor.
"""

from __future__ import annotations

from corral.config import GenerationConfig
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import ModelInfo

__all__ = ["DEFAULT_LIMIT", "check_prompt_length", "max_tokens_for"]

DEFAULT_LIMIT = 4096
"""Unless generation.max_prompt_tokens / max_tokens_limit set them: the prompt and
max_tokens limits of a model whose config gives no context length, and the least
max_tokens limit of any model (generation stops where the context is full anyway)."""


def check_prompt_length(config: GenerationConfig, tokens: int, info: ModelInfo | None) -> None:
    """A prompt fits generation.max_prompt_tokens when set, else the model's context
    less one token to generate.

    Raises:
        EngineClientError: InvalidParams naming the limit and the key that sets it.
    """
    context = info.max_context if info is not None else None
    limit = config.max_prompt_tokens
    if limit is not None:
        over = f"over generation.max_prompt_tokens ({limit})"
    elif context is not None:
        limit = context - 1
        over = (f"over the model's context of {context} (at most {limit}, leaving one "
                f"token to generate; generation.max_prompt_tokens sets the limit)")
    else:
        limit = DEFAULT_LIMIT
        over = (f"over {limit} (the model's context is unknown; "
                f"generation.max_prompt_tokens sets the limit)")
    if tokens > limit:
        raise EngineClientError(Code.INVALID_PARAMS, f"prompt: {tokens} tokens, {over}",
                                {"field": "prompt", "prompt_tokens": tokens, "limit": limit})


def max_tokens_for(config: GenerationConfig, requested: int | None, prompt_tokens: int,
                   info: ModelInfo | None) -> int:
    """The request's max_tokens (or the default), checked against
    generation.max_tokens_limit when set, else against the model's context (or
    `DEFAULT_LIMIT` when that is more, so that what an earlier default let through
    still goes through); then cut to what the context leaves after the prompt:
    generation ends where it is full.

    Raises:
        EngineClientError: InvalidParams naming the limit and the key that sets it.
    """
    max_tokens = requested or config.default_max_tokens
    context = info.max_context if info is not None else None
    limit = config.max_tokens_limit
    if limit is not None:
        over = f"over generation.max_tokens_limit ({limit})"
    elif context is not None and context >= DEFAULT_LIMIT:
        limit = context
        over = (f"over the model's context of {context} "
                f"(generation.max_tokens_limit sets the limit)")
    else:
        limit = DEFAULT_LIMIT
        known = f"is {context}" if context is not None else "is unknown"
        over = (f"over {limit} (the model's context {known}; "
                f"generation.max_tokens_limit sets the limit)")
    if max_tokens > limit:
        raise EngineClientError(Code.INVALID_PARAMS, f"max_tokens: {max_tokens}, {over}",
                                {"field": "max_tokens", "limit": limit})
    if context is not None and prompt_tokens + max_tokens > context:
        max_tokens = max(1, context - prompt_tokens)
    return max_tokens
