"""Log-probabilities reported with a sequence's tokens: the sampled token's and, for a
sequence that asked, its most likely alternatives.

Both come from the one row of log-probabilities the sampler drew from (after the
logits processors, before temperature and the top-p/top-k/min-p filters, as mlx_lm
reports them). The alternatives cost one `argpartition` over that row, made only for a
sequence that asked, so the others in the batch pay nothing.

Engine thread only: it must never touch trio. Nothing here fails a step but what MLX
itself raises.
"""

from __future__ import annotations

from typing import Any, cast

from corral.protocol.messages import TokenLogprob

__all__ = ["TokenLogprobs", "token_logprobs"]

TokenLogprobs = tuple[float, str, list[TokenLogprob] | None]
"""The sampled token's log-probability, the token decoded alone, and the alternatives
(None when none were asked for)."""


def token_logprobs(tokenizer: Any, token: int, logprobs: Any, top: int) -> TokenLogprobs:
    """What a sequence that asked for log-probabilities reports with `token`.

    Args:
        tokenizer: the model's tokenizer; each token is decoded alone.
        token: the sampled token.
        logprobs: the 1-D log-probabilities (an `mx.array`) it was sampled from.
        top: how many alternatives to report, 0 for none.

    Returns:
        See `TokenLogprobs`. The alternatives are ordered by log-probability, best
        first, ties by token id, as `argmax` breaks them: under greedy sampling the
        first is the sampled token.
    """
    import mlx.core as mx

    if top <= 0:
        return float(logprobs[token].item()), _piece(tokenizer, token), None
    ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
    values = logprobs[ids]
    chosen = logprobs[token]
    mx.eval(ids, values, chosen)
    top_values = cast(list[float], values.tolist())
    top_ids = cast(list[int], ids.tolist())
    found = list(zip(top_values, top_ids, strict=True))
    ranked = sorted(found, key=lambda pair: (-pair[0], pair[1]))
    alternatives = [TokenLogprob(i, _piece(tokenizer, i), value) for value, i in ranked]
    return float(chosen.item()), _piece(tokenizer, token), alternatives


def _piece(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token]))
