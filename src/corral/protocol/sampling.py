"""The one `SamplingParams`: every per-request knob of a generation, its range declared
once, on the type.

Each field is declared here with its bounds (msgspec `Meta` constraints), so decoding a
request is its validation and every transport applies the same bounds: the JSON-RPC
and embedded `GenerateParams` and the OpenAI request Structs inherit these fields, and
the engine receives this Struct unchanged inside its `EngineSequence`. A value built
in Python (which msgspec does not check) is checked by `validate`. The engine adds
only the checks that depend on the model (vocabulary ids, context, grammar).

Fields are grouped as vLLM's `SamplingParams` and mlx_lm's server group them: the
sampler, the logits processors, the stopping criteria, the output. They are flat on
the wire (OpenAI's and vLLM's shape), so a knob added here reaches every transport
without touching it. Data only: no behaviour beyond reading the fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from corral.protocol.codec import convert_params

__all__ = [
    "MAX_INT32", "MAX_LOGIT_BIAS", "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "MAX_TOP_LOGPROBS",
    "Bias", "Fraction", "LogitBias", "Penalty", "Probability", "RepetitionPenalty",
    "SamplingParams", "Seed", "StopString", "StopStrings", "Temperature", "TokenCount",
    "TokenId", "TopK", "TopLogprobs",
]

# Every value here crosses into msgpack (64-bit integers at most) and into MLX (token ids
# are int32), so each is range-checked where it enters: out of range is InvalidParams
# naming the field, never an OverflowError deep inside a request.
MAX_INT32: Final = 2**31 - 1
MAX_STOP_STRINGS: Final = 16
MAX_STOP_CHARS: Final = 256  # the engine checks every stop string at every step
MAX_TOP_LOGPROBS: Final = 20  # OpenAI's bound
MAX_LOGIT_BIAS: Final = 1024  # biased tokens per request

TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32)]
"""A token id, as MLX holds it (int32); the runtime also checks it against the vocabulary."""
TokenCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT32)]
"""A positive number of tokens (max_tokens); the runtime applies the configured limit."""
TopK = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
StopString = Annotated[str, msgspec.Meta(max_length=MAX_STOP_CHARS)]
StopStrings = StopString | Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)]
"""One stop string or a list of them, as OpenAI takes `stop`."""
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
Probability = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]  # OpenAI's range
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0, le=10.0)]
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]  # OpenAI's range
LogitBias = Annotated[dict[TokenId, Bias], msgspec.Meta(max_length=MAX_LOGIT_BIAS)]
"""Token id → bias added to its logit (JSON object keys are the ids as strings)."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one sequence is sampled and when it stops; the same object from the edge
    to the engine.

    Randomness depends only on (seed, token index), never on global RNG state or on the
    other requests in the batch. `max_tokens` counts every token of the sequence,
    a resumed sequence's `generated` ones included; the runtime sets it (from the
    config's default and the model's context) when the request leaves it out.
    """

    # -- the sampler ----------------------------------------------------------------
    temperature: Temperature = 0.0
    """0 is greedy; otherwise logits are divided by it before the draw."""
    top_p: Probability = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    top_k: TopK = 0
    """Only the k most likely tokens (0: all)."""
    min_p: Fraction = 0.0
    """Only tokens at least min_p times as likely as the most likely one (0: all)."""
    seed: Seed | None = None
    """Makes sampling repeatable (and a crashed stream resumable); None draws one."""

    # -- the logits processors ------------------------------------------------------
    repetition_penalty: RepetitionPenalty | None = None
    """mlx_lm's (sign-aware, multiplicative) penalty on the last 20 tokens; 1 is none."""
    presence_penalty: Penalty | None = None
    """OpenAI's: subtracted once from the logit of each token of the last 20."""
    frequency_penalty: Penalty | None = None
    """OpenAI's: subtracted per occurrence in the last 20 tokens."""
    logit_bias: LogitBias = {}

    # -- stopping -------------------------------------------------------------------
    max_tokens: TokenCount | None = None
    """The most tokens to generate; None: what the config and the context allow."""
    stop: StopStrings | None = None
    """Stop strings: the text ends before the first one found (see `stop_strings`)."""
    stop_token_ids: list[TokenId] = []
    """Tokens that end the sequence as its EOS tokens do (not part of the text)."""
    min_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32)] = 0
    """No stop (an EOS or stop token, a stop string) ends the sequence before this many
    tokens (vLLM's); `max_tokens` still ends it."""
    ignore_eos: bool = False
    """The model's EOS tokens do not end the sequence (vLLM's): it runs to `max_tokens`,
    a stop token or a stop string."""

    # -- the output -----------------------------------------------------------------
    logprobs: bool = False
    """Report the sampled tokens' log-probabilities."""
    top_logprobs: TopLogprobs = 0
    """Also report this many most likely alternatives per token (implies `logprobs`)."""

    @property
    def deterministic(self) -> bool:
        """Greedy or seeded: a re-run (or a resume after a crash) gives the same tokens."""
        return self.temperature == 0.0 or self.seed is not None

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def reports_logprobs(self) -> bool:
        """Whether log-probabilities are reported (`logprobs`, or alternatives)."""
        return self.logprobs or self.top_logprobs > 0

    def sampling_fields(self) -> dict[str, Any]:
        """These fields by name, as keyword arguments for another request type that
        holds them (an edge's request builds `GenerateParams` so)."""
        return {name: getattr(self, name) for name in SamplingParams.__struct_fields__}

    def sampling_params(self) -> SamplingParams:
        """These fields alone, as a `SamplingParams` (from a request type that adds its
        own): what travels on to the engine."""
        if type(self) is SamplingParams:
            return self
        return SamplingParams(**self.sampling_fields())

    def validate(self) -> None:
        """Check the declared ranges of a value built in Python (decoding checks them
        already): the same bounds as every transport's.

        Raises:
            EngineClientError: InvalidParams naming the field (`top_p: expected > 0`).
        """
        convert_params(msgspec.to_builtins(self.sampling_params()), SamplingParams)
