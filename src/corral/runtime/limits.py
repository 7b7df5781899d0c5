"""How long a prompt and a completion may be: the serving model's context first, then
the config's limits.

Pure functions of the request and the model's `ModelInfo`: they raise InvalidParams
naming the limit and the key that sets it, and never touch an actor. A fallback model
is checked against its own context, since the caller passes the serving model's info.
"""

from __future__ import annotations

from corral.config import GenerationConfig
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import ModelInfo

__all__ = ["UNKNOWN_CONTEXT_LIMIT", "check_prompt_length", "max_tokens_for"]

UNKNOWN_CONTEXT_LIMIT = 4096
"""The prompt and max_tokens limits of a model whose config gives no context length,
unless generation.max_prompt_tokens / max_tokens_limit set them."""


def check_prompt_length(config: GenerationConfig, tokens: int, info: ModelInfo | None) -> None:
    """A prompt leaves at least one token of the model's context to generate, and fits
    generation.max_prompt_tokens when that is set.

    Raises:
        EngineClientError: InvalidParams naming the limit, and the key when one sets it.
    """
    context = info.max_context if info is not None else None
    if context is not None and tokens + 1 > context:
        raise EngineClientError(
            Code.INVALID_PARAMS,
            f"prompt: {tokens} tokens, model context is {context} "
            f"(a prompt may have at most {context - 1}, leaving one token to generate)",
            {"field": "prompt", "prompt_tokens": tokens, "limit": context - 1,
             "context": context})
    limit, over = _configured(config.max_prompt_tokens, "max_prompt_tokens", context)
    if limit is not None and tokens > limit:
        raise EngineClientError(Code.INVALID_PARAMS, f"prompt: {tokens} tokens, {over}",
                                {"field": "prompt", "prompt_tokens": tokens, "limit": limit})


def max_tokens_for(config: GenerationConfig, requested: int | None, prompt_tokens: int,
                   info: ModelInfo | None, generated: int = 0) -> int:
    """The number of tokens a request may generate after its `prompt_tokens` and the
    `generated` tokens a lost run already sent (which count toward `requested`).

    Given, `requested` must fit generation.max_tokens_limit (when set) and what the
    model's context leaves after the prompt, as vLLM checks it: a request that cannot
    have what it asked for is refused rather than cut short. Absent, it is what the
    context leaves, at most generation.default_max_tokens (when set) and
    max_tokens_limit.

    Raises:
        EngineClientError: InvalidParams naming the limit, and the key when one sets it.
    """
    if generated and requested is not None:
        if generated >= requested:
            raise EngineClientError(
                Code.INVALID_PARAMS, f"generated: {generated} tokens already, max_tokens "
                f"{requested} leaves none to generate", {"field": "generated"})
        requested -= generated
    prompt_tokens += generated
    context = info.max_context if info is not None else None
    limit, over = _configured(config.max_tokens_limit, "max_tokens_limit", context)
    room = context - prompt_tokens if context is not None else None
    if requested is None:
        caps = [c for c in (room, config.default_max_tokens, limit) if c is not None]
        return max(1, min(caps))  # never empty: without a context, `limit` is set
    if limit is not None and requested > limit:
        raise EngineClientError(Code.INVALID_PARAMS, f"max_tokens: {requested}, {over}",
                                {"field": "max_tokens", "limit": limit})
    if room is not None and requested > room:
        raise EngineClientError(
            Code.INVALID_PARAMS,
            f"max_tokens: {requested}, but the prompt's {prompt_tokens} tokens leave "
            f"{room} of the model context of {context}",
            {"field": "max_tokens", "limit": room, "prompt_tokens": prompt_tokens,
             "context": context})
    return requested


def _configured(value: int | None, key: str, context: int | None) -> tuple[int | None, str]:
    """The limit `generation.<key>` sets, else `UNKNOWN_CONTEXT_LIMIT` for a model whose
    context is unknown, else None (the context alone decides); and how a refusal says
    what it is over."""
    if value is not None:
        return value, f"over generation.{key} ({value})"
    if context is None:
        return UNKNOWN_CONTEXT_LIMIT, (f"over {UNKNOWN_CONTEXT_LIMIT} (the model's context "
                                       f"is unknown; generation.{key} sets the limit)")
    return None, ""
