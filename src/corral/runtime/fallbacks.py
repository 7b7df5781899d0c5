"""A model's last fallbacks: a cached completion or a default response.

When no model of a request's chain (the model, then its fallback aliases) can answer
before the first token, the `cached` step serves the last successful completion of the
same prompt and parameters within its TTL, and the `default` step serves a fixed text.
The cache is `corral.resilience.CachedFallback`, the user's toolkit, on the runtime's
clock. This module only remembers and answers: it never calls a model and never hides a
client error (InvalidParams and the like) or a cancellation.
"""

from __future__ import annotations

from typing import Final, final

import msgspec

from corral.config import FallbackResponse, ModelConfig
from corral.protocol.errors import CLIENT_ERROR_CODES, Code
from corral.protocol.messages import FinishReason, GenerateParams
from corral.resilience import CachedFallback
from corral.resilience.classify import code_of

__all__ = ["FallbackAnswer", "ResponseFallbacks"]

_NEVER_ANSWERED: Final[frozenset[Code]] = CLIENT_ERROR_CODES | {Code.CANCELLED}
_KEY_ENCODER: Final = msgspec.json.Encoder(order="deterministic")


class FallbackAnswer(msgspec.Struct, frozen=True):
    """A completion served by a fallback step.

    Attributes:
        kind: "cached" or "default" (the `X-Corral-Fallback` header's value).
        model: the alias whose completion was cached, or the requested alias (default).
        text, token_ids, finish_reason, prompt_tokens: the completion.
    """

    kind: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int


def _key(request: GenerateParams) -> bytes:
    """The prompt and parameters of `request`, without what differs per call."""
    same = msgspec.structs.replace(request, request_id=None, client=None, timeout_ms=None)
    return _KEY_ENCODER.encode(same)


@final
class ResponseFallbacks:
    """The cached and default steps of every model's fallbacks, keyed by requested alias."""

    def __init__(self) -> None:
        self._caches: dict[str, CachedFallback] = {}

    def _cache(self, config: ModelConfig) -> CachedFallback | None:
        for step in config.fallback_responses:
            if step.cached_ttl_ms is not None:
                cache = self._caches.get(config.alias)
                if cache is None or cache.ttl != step.cached_ttl_ms / 1000.0:
                    cache = self._caches[config.alias] = CachedFallback(
                        step.cached_ttl_ms / 1000.0)
                return cache
        return None

    def remember(self, config: ModelConfig, request: GenerateParams,
                 answer: FallbackAnswer) -> None:
        """Keep a successful completion, if the model's fallbacks cache any."""
        cache = self._cache(config)
        if cache is not None:
            cache.store(_key(request), answer)

    def answer(self, config: ModelConfig, request: GenerateParams,
               error: BaseException) -> FallbackAnswer | None:
        """What the model's cached or default step serves in place of `error`, or None."""
        if not config.fallback_responses or code_of(error) in _NEVER_ANSWERED:
            return None
        for step in config.fallback_responses:
            found = self._answer(config, request, step)
            if found is not None:
                return found
        return None

    def _answer(self, config: ModelConfig, request: GenerateParams,
                step: FallbackResponse) -> FallbackAnswer | None:
        if step.default is not None:
            return FallbackAnswer("default", config.alias, step.default, [], "stop", 0)
        cache = self._cache(config)
        recovered = cache.lookup(_key(request)) if cache is not None else None
        if recovered is None:
            return None
        cached: FallbackAnswer = recovered.value
        return msgspec.structs.replace(cached, kind="cached")
