"""One sequence's `SamplingParams` as `BatchGenerator.insert` takes them: its sampler,
its logits processors and the tokens that stop it.

`sequence_sampler` gives `insert(samplers=[...])` one sequence's sampler: the filters of
mlx_lm's `make_sampler`, in the same order, then a categorical draw with a key derived
from the sequence's seed and the index of the token drawn. So a seeded sequence samples
the same tokens whatever else is in the batch, and a resumed one (started at index
len(generated)) continues exactly where it stopped. `logits_processors` are mlx_lm's
(`make_logits_processors`), each called once per token of its sequence; `stop_token_ids`
are the tokens that end it.

Engine thread only. It must never use global RNG state or anything about the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.protocol.messages import SamplingParams

__all__ = ["key_seed", "logits_processors", "sequence_sampler", "stop_token_ids"]

LogitsProcessor = Callable[[Any, Any], Any]
"""mlx_lm's: (the sequence's tokens so far, one row of logits) -> logits."""

_MASK64 = (1 << 64) - 1


def key_seed(seed: int, index: int) -> int:
    """A 64-bit key seed from (seed, token index): splitmix64 of their mix.

    Stands in for a fold-in, which `mx.random` lacks: the key of token `index` is
    `mx.random.key(key_seed(seed, index))`, so it depends on nothing else.
    """
    z = ((seed & _MASK64) + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sequence_sampler(sampling: SamplingParams, seed: int, start: int,
                 vocab_size: int) -> Callable[[Any], Any] | None:
    """A sampler for one sequence, or None for greedy (the batch's shared argmax).

    `GenerationBatch` calls it once per token of its sequence, the first call for token
    index `start` (see the note in `corral.engine.thread.Engine` on mlx_lm's
    pipelining), with one row of log-probabilities, or the whole batch when the batch
    holds this sequence alone.
    """
    if sampling.temperature == 0.0:
        return None
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    filters: list[Callable[[Any], Any]] = []
    top_p, min_p, top_k = sampling.top_p, sampling.min_p, sampling.top_k
    # The same filters, in the same order, as mlx_lm's make_sampler.
    if 0.0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p, 1))
    if 0 < top_k < vocab_size:
        filters.append(lambda x: apply_top_k(x, top_k))
    inverse_temperature = 1.0 / sampling.temperature
    index = start

    def sample(logprobs: Any) -> Any:
        nonlocal index
        key = mx.random.key(key_seed(seed, index))
        index += 1
        for keep in filters:
            logprobs = keep(logprobs)
        return mx.random.categorical(logprobs * inverse_temperature, key=key)

    return sample


def stop_token_ids(sampling: SamplingParams, eos_token_ids: list[int]) -> list[int]:
    """The tokens that end the sequence (not part of its text), sorted: the model's EOS
    tokens (unless `ignore_eos`) and the request's `stop_token_ids`."""
    eos = [] if sampling.ignore_eos else eos_token_ids
    return sorted({*eos, *sampling.stop_token_ids})


def logits_processors(sampling: SamplingParams, start: int,
                      stop_ids: list[int]) -> list[LogitsProcessor]:
    """The sequence's logits processors, in order, its first call being for token index
    `start` (a resumed sequence's len(generated)); `stop_ids` are its `stop_token_ids`.
    A grammar's mask, when the sequence has one, goes after these."""
    from mlx_lm.sample_utils import make_logits_processors

    processors: list[LogitsProcessor] = make_logits_processors(
        logit_bias=sampling.logit_bias or None,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty)
    if sampling.min_tokens > start and stop_ids:
        processors.append(_no_stop_before(sampling.min_tokens, start, stop_ids))
    return processors


def _no_stop_before(min_tokens: int, start: int, stop_ids: list[int]) -> LogitsProcessor:
    """A processor that takes the stop tokens out of the draw of the tokens before
    index `min_tokens`: vLLM's `min_tokens`, as an mlx_lm logits processor (called once
    per token, the first time for token index `start`)."""
    import mlx.core as mx

    banned = mx.array(stop_ids)
    index = start

    def no_stop(tokens: Any, logits: Any) -> Any:
        nonlocal index
        drawn, index = index, index + 1
        if drawn >= min_tokens:
            return logits
        return logits.at[:, banned].add(-mx.inf)

    return no_stop
