"""What a client asks for and what it gets back: the generate call, sampling, tools,
chat messages, tokens, usage and model info; frozen msgspec Structs, no behaviour.

Every interface converts its request into `GenerateParams` here, and the engine's
output comes back as `TokenOut` and `EngineStep`. The messages the serving actors
exchange are in `serving_messages`, the kernel's lifecycle in `lifecycle`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from corral.protocol.durations import DURATION_PATTERN, MAX_KEEP_ALIVE_S
from corral.protocol.grammar import ResponseFormat, response_format_grammar

# -- generation: what a client asks for and what it gets back ------------------------

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error", "tool_calls"]
"""How a sequence ended; "tool_calls" is only ever the runtime's reading of a "stop"
after which the model's text held tool calls."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-request sampling. Temperature 0 is greedy; a seed makes sampling repeatable.

    Randomness depends only on (seed, token index), never on global RNG state or on the
    other requests in the batch. `grammar`, a serialized llguidance grammar (see
    `corral.protocol.grammar`), constrains the tokens sampled: the sequence ends (on an
    EOS token) only where the grammar accepts.
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] = {}
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    logprobs: bool = False
    grammar: str | None = None
    top_logprobs: int = 0  # alternatives reported per token (with `logprobs`)

    @property
    def deterministic(self) -> bool:
        """Greedy or seeded: a re-run (or a resume after a crash) gives the same tokens."""
        return self.temperature == 0.0 or self.seed is not None


class FunctionCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """OpenAI's `tool_calls[]` item, in an assistant message or a reply."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


FunctionName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
"""The name of a function a model may call."""


class ToolFunction(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A function the model may call; `parameters` is its arguments' JSON schema."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """OpenAI's `tools[]` item."""

    function: ToolFunction
    type: Literal["function"] = "function"


class ToolChoiceFunction(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`tool_choice` naming the one function the model must call."""

    function: ToolChoiceFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
"""none: tools are not shown to the model; auto: it may call them; required: it calls
one or more; a named function: it calls that one."""


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A chat turn. An assistant turn may carry the `tool_calls` it made; a `tool` turn
    answers the call `tool_call_id`."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] = []
    tool_call_id: str | None = None
    name: str | None = None


class Usage(msgspec.Struct, frozen=True):
    """Token counts of one request. `cached_tokens` of the `prompt_tokens` were taken
    from the prefix cache rather than prefilled."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EngineSequence(msgspec.Struct, frozen=True, tag=True):
    """One sequence handed to an engine: prompt token ids and how to continue them.

    `seq_id` is the engine-local id (the stream id); `generated` holds tokens already
    delivered to the client before a crash, so a resumed sequence re-prefills
    prompt + generated and continues at token index len(generated).
    """

    seq_id: int
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    generated: list[int] = []


class TokenLogprob(msgspec.Struct, frozen=True):
    """A token with its log-probability: `id`, and `token`, the id decoded alone by the
    model's tokenizer (a piece of a multi-byte character decodes to U+FFFD)."""

    id: int
    token: str
    logprob: float


class TokenOut(msgspec.Struct, frozen=True, array_like=True):
    """One sequence's output of one engine step.

    `text` is the newly decodable text (may be empty while a multi-byte character is
    incomplete); `finish_reason` is set on the sequence's last step; `logprob` is the
    sampled token's log-probability and `piece` the token decoded alone, when they were
    asked for; `top_logprobs` the most likely tokens, best first, when alternatives were
    asked for. `cached_tokens`, on the first token of a sequence (or of its resumption)
    only, counts the leading tokens whose KV came from the prefix cache (one byte on the
    wire for the others).
    """

    seq_id: int
    token: int
    text: str
    logprob: float | None
    finish_reason: FinishReason | None
    cached_tokens: int = 0
    piece: str | None = None
    top_logprobs: list[TokenLogprob] | None = None


class EngineStep(msgspec.Struct, frozen=True, tag=True):
    """What one `BatchGenerator.next()` produced, numbered from the engine's start.

    `prefilled` lists the sequences whose prompt processing finished in this step.
    """

    step: int
    outputs: list[TokenOut]
    prefilled: list[int] = []


class PrefixCacheStatistics(msgspec.Struct, frozen=True):
    """One engine's prefix cache, as counters since the engine started.

    Attributes:
        enabled: the cache is in use (configured on, and the model's KV cache can be
            trimmed and merged).
        queries: prompt tokens looked up (vLLM's `prefix_cache_queries`).
        hits: prompt tokens whose KV was reused instead of prefilled
            (vLLM's `prefix_cache_hits`).
        bytes: KV bytes held in memory now.
        entries: prefixes held in memory now.
        evictions: prefixes dropped from memory to stay under `max_bytes`.
        disk_bytes: bytes of cache files on disk now.
        disk_entries: cache files on disk now.
        disk_writes: cache files written.
        disk_loads: cache files read back (after a restart, or once evicted).
        disk_hit_tokens: prompt tokens reused from files read back.
        disk_errors: bad files skipped and deleted, and writes that failed.
    """

    enabled: bool = False
    queries: int = 0
    hits: int = 0
    bytes: int = 0
    entries: int = 0
    evictions: int = 0
    disk_bytes: int = 0
    disk_entries: int = 0
    disk_writes: int = 0
    disk_loads: int = 0
    disk_hit_tokens: int = 0
    disk_errors: int = 0


class ToolCalling(msgspec.Struct, frozen=True):
    """A model's tool calls: `parser` names the `mlx_lm.tool_parsers` module that reads
    them (mlx_lm's loader infers it from the chat template); `marker_tokens` says
    whether the call's start and end markers are single tokens of the vocabulary (as
    Qwen's `<tool_call>`), which a grammar must then name as tokens, not as text."""

    parser: str
    marker_tokens: bool


class ModelInfo(msgspec.Struct, frozen=True):
    """A loaded model as its engine reports it."""

    path: str
    vocab_size: int
    eos_token_ids: list[int]
    max_context: int | None
    load_seconds: float
    has_chat_template: bool
    tool_calling: ToolCalling | None = None
    """How this model writes tool calls, or None when its chat template has no tool
    support."""
    structured_output: bool = False  # its tokenizer can drive grammars (`grammar`)


# -- the public generate call, as every interface receives it -----------------------------
# Every value here crosses into msgpack (64-bit integers at most) and into MLX (token ids
# are int32), so each is range-checked where it enters: out of range is InvalidParams
# naming the field, never an OverflowError deep inside a request.

MAX_INT32: Final = 2**31 - 1
MAX_STOP_STRINGS: Final = 16
MAX_STOP_CHARS: Final = 256  # the engine checks every stop string at every step
MAX_NAME_CHARS: Final = 256  # model aliases, request ids and client names

TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32)]
"""A token id, as MLX holds it (int32); the runtime also checks it against the vocabulary."""
TokenCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT32)]
"""A positive number of tokens (max_tokens); the runtime applies the configured limit."""
TopK = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TimeoutMs = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT32)]
"""A deadline in milliseconds, up to about 24 days."""
KeepAliveSeconds = Annotated[float, msgspec.Meta(ge=-MAX_KEEP_ALIVE_S, le=MAX_KEEP_ALIVE_S)]
"""How long a model stays loaded once idle: 0 unloads it right after, negative never."""
Duration = Annotated[str, msgspec.Meta(pattern=DURATION_PATTERN)]
"""A duration as Ollama (and Go) writes it: "5m", "1h30m", "250ms", "-1s", "0"."""
StreamId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
ALIAS_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z"  # \Z: no newline after
"""What a model alias may be: a letter or digit, then up to 127 letters, digits, ``.``,
``_``, ``:`` or ``-`` (``SmolLM2-135M-Instruct.Q4_1``, ``ollama:qwen3:0.6b``). No ``/``
and no space: an alias names a subtree of actors, and a ``/`` in it would address
inside another model's subtree."""
Alias = Annotated[str, msgspec.Meta(pattern=ALIAS_PATTERN)]
"""A model alias as a client gives it to load or unload a model (see `ALIAS_PATTERN`)."""
StopString = Annotated[str, msgspec.Meta(max_length=MAX_STOP_CHARS)]

MAX_TOP_LOGPROBS: Final = 20  # OpenAI's bound
MAX_CHOICES: Final = 8
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)]
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]

# The ranges of the sampling fields, public so that a transport's request Struct can
# type its own fields with them: it then decodes to values `GenerateParams` takes as
# they are, with the error naming the field as that transport's client sent it.
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]  # OpenAI's range
_Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]  # OpenAI's range
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
"""A sampling temperature: 0 is greedy."""
Probability = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
"""A probability mass above 0 (top_p)."""
MAX_TOOLS: Final = 128
"""The most tools one request may give."""
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0, le=10.0)]
StopStrings = StopString | Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)]
Tools = Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)]


class GenerateParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A generate or complete call. Decoding this struct is the input validation: an
    out-of-range value (nan and infinities included) or unknown field is an
    InvalidParams error naming the field.

    Exactly one of `prompt` (text or token ids) and `messages` (chat turns) is given.
    `tools`, `tool_choice` and `parallel_tool_calls` go with `messages`, as OpenAI's
    function calling has them (`runtime/tools.py`).
    `client` names who asks, for fair admission (see `Admit`); a transport sets it to
    the connection or address the request came from, whatever the request said.
    `response_format` (OpenAI's shapes) constrains the output; `sampling` turns it into
    the grammar the engine enforces, and the runtime checks that grammar compiles
    (GuidanceError otherwise) before admission.
    `top_logprobs` > 0 implies `logprobs`. `n` choices run as `n` sequences (and take
    `n` stream slots); see `corral.runtime.choices`.
    `generated` continues a generation another server lost (the ids it already sent,
    after the prompt): the engine starts after them as a worker restart does, so the
    text, a seeded sampler's draws, penalties and a grammar pick up where they stopped;
    they count toward `max_tokens` and are not sent again. Prompt only, one choice, no
    tools.
    `keep_alive` (seconds; 0: unload right after, negative: for good) is how long the
    model stays loaded once idle after this request; None leaves the model's own
    (`generation.models[].keep_alive`). See `corral.runtime.keep_alive`.
    """

    model: Name | None = None
    prompt: str | list[TokenId] | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature = 0.0
    top_p: Probability = 1.0
    top_k: TopK = 0
    min_p: Fraction = 0.0
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[TokenId, _Bias], msgspec.Meta(max_length=1024)] = {}
    seed: Seed | None = None
    stop: StopStrings | None = None
    stop_token_ids: list[TokenId] = []
    logprobs: bool = False
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    top_logprobs: TopLogprobs = 0
    n: ChoiceCount = 1
    timeout_ms: TimeoutMs | None = None
    request_id: Name | None = None
    client: Name | None = None
    generated: list[TokenId] = []
    keep_alive: KeepAliveSeconds | None = None

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias), seed=self.seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids),
            logprobs=self.logprobs or self.top_logprobs > 0, top_logprobs=self.top_logprobs,
            grammar=response_format_grammar(self.response_format))


class Choice(msgspec.Struct, frozen=True):
    """One choice of a non-streaming call, whole.

    `logprobs` (the sampled tokens' log-probabilities) and `tokens` (each token decoded
    alone) when log-probabilities were asked for; `top_logprobs`, for each token, the
    most likely tokens, best first, when alternatives were.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    tool_calls: list[ToolCall] = []


class Completion(msgspec.Struct, frozen=True):
    """The whole result of a non-streaming call: the first choice's fields (the whole
    answer when `n` is 1), and every choice in `choices`. `usage` counts the prompt once
    and the tokens of every choice. `fallback` names
    what served it in place of the model asked for (another alias, "cached",
    "default"), else None."""

    stream_id: int
    model: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[float] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    choices: list[Choice] = []
    tool_calls: list[ToolCall] = []
    fallback: str | None = None
