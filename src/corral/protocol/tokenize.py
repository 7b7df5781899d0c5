"""vLLM's POST /tokenize and /detokenize bodies, as its OpenAI-compatible server takes
and answers them.

Data only; `server/tokenize.py` serves them. Decoding is the validation, as for every
request: an unknown field is InvalidParams naming it.
"""

from __future__ import annotations

import msgspec

from corral.protocol.messages import Name, TokenId
from corral.protocol.openai import ChatMessageIn

__all__ = ["DetokenizeRequest", "DetokenizeResponse", "TokenizeRequest", "TokenizeResponse"]


class TokenizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One of `prompt` (text, encoded as a completion's prompt; `add_special_tokens`
    says whether the tokenizer adds its BOS and the like) and `messages` (chat turns,
    encoded as a chat request's prompt: through the model's chat template, with its
    generation prompt)."""

    model: Name | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True


class TokenizeResponse(msgspec.Struct, frozen=True):
    """`max_model_len`: the model's context, None when its config gives none."""

    count: int
    max_model_len: int | None
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: Name | None = None
    tokens: list[TokenId]


class DetokenizeResponse(msgspec.Struct, frozen=True):
    prompt: str
