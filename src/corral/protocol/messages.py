"""What a client asks for and what it gets back: the generate call, sampling, tools,
chat messages, tokens, usage and model info; frozen msgspec Structs, no behaviour.

Every interface converts its request into `GenerateParams` here, and the engine's
output comes back as `TokenOut` and `EngineStep`. The messages the serving actors
exchange are in `serving_messages`, the kernel's lifecycle in `lifecycle`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec

from corral.protocol.durations import DURATION_PATTERN, MAX_KEEP_ALIVE_S
from corral.protocol.grammar import ResponseFormat
from corral.protocol.sampling import MAX_INT32 as MAX_INT32
from corral.protocol.sampling import MAX_STOP_CHARS as MAX_STOP_CHARS
from corral.protocol.sampling import MAX_STOP_STRINGS as MAX_STOP_STRINGS
from corral.protocol.sampling import MAX_TOP_LOGPROBS as MAX_TOP_LOGPROBS
from corral.protocol.sampling import Bias as Bias
from corral.protocol.sampling import Fraction as Fraction
from corral.protocol.sampling import Penalty as Penalty
from corral.protocol.sampling import Probability as Probability
from corral.protocol.sampling import RepetitionPenalty as RepetitionPenalty
from corral.protocol.sampling import SamplingParams as SamplingParams
from corral.protocol.sampling import Seed as Seed
from corral.protocol.sampling import StopString as StopString
from corral.protocol.sampling import StopStrings as StopStrings
from corral.protocol.sampling import Temperature as Temperature
from corral.protocol.sampling import TokenCount as TokenCount
from corral.protocol.sampling import TokenId as TokenId
from corral.protocol.sampling import TopK as TopK
from corral.protocol.sampling import TopLogprobs as TopLogprobs

# -- generation: what a client asks for and what it gets back ------------------------

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error", "tool_calls"]
"""How a sequence ended; "tool_calls" is only ever the runtime's reading of a "stop"
after which the model's text held tool calls."""


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

    `seq_id` is the engine-local id (the stream id); `sampling` is the request's, as
    the client sent it, with `max_tokens` set; `grammar`, a serialized llguidance
    grammar (`corral.engine.grammar` writes them), constrains the tokens sampled: the
    sequence ends (on an EOS token) only where the grammar accepts. `generated` holds
    tokens already delivered to the client before a crash, so a resumed sequence
    re-prefills prompt + generated and continues at token index len(generated).
    """

    seq_id: int
    prompt: list[int]
    sampling: SamplingParams
    grammar: str | None = None
    generated: list[int] = []

    @property
    def remaining(self) -> int:
        """Tokens left to generate: `max_tokens` less those already `generated`."""
        return (self.sampling.max_tokens or 0) - len(self.generated)


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


class Thinking(msgspec.Struct, frozen=True):
    """How a model marks its reasoning, as mlx_lm's tokenizer infers it (`has_thinking`):
    the text of its start and end markers (`<think>`, `</think>`) and their token ids."""

    start: str
    end: str
    start_ids: list[int]
    end_ids: list[int]


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
    thinking: Thinking | None = None
    """How this model marks its reasoning, or None when it does not think."""


# -- the public generate call, as every interface receives it -----------------------------
# Ranges are declared once, in `corral.protocol.sampling` (re-exported here); what the
# request adds is bounded below.

MAX_NAME_CHARS: Final = 256  # model aliases, request ids and client names
MAX_TOOLS: Final = 128

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
Tools = Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)]

MAX_CHOICES: Final = 8
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]

Priority = Annotated[int, msgspec.Meta(ge=-MAX_INT32, le=MAX_INT32)]
"""A request's priority, as vLLM's: a lower value is admitted first (0 by default)."""

MAX_TEMPLATE_KWARGS: Final = 32
MAX_TEMPLATE_KWARGS_BYTES: Final = 16 * 1024  # their JSON; checked by the runtime
TemplateKwargName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")]
"""A chat template variable: a Python identifier (it is passed as a keyword argument)."""
ChatTemplateKwargs = Annotated[dict[TemplateKwargName, Any],
                               msgspec.Meta(max_length=MAX_TEMPLATE_KWARGS)]
"""More variables for the chat template (`enable_thinking` for Qwen 3), as
`mlx_lm.server` and vLLM take `chat_template_kwargs`: JSON values, at most
`MAX_TEMPLATE_KWARGS_BYTES` of them as JSON; the names the rendering itself sets
(`RESERVED_TEMPLATE_KWARGS`) are refused."""
RESERVED_TEMPLATE_KWARGS: Final = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "return_dict", "return_tensors",
    "return_assistant_tokens_mask", "chat_template", "tokenizer_kwargs", "padding",
    "truncation", "max_length"})


class GenerateParams(SamplingParams, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A generate or complete call: the `SamplingParams` fields (flat, as OpenAI's and
    JSON-RPC's bodies have them) and what to generate from. Decoding this struct is the
    input validation: an out-of-range value (nan and infinities included) or unknown
    field is an InvalidParams error naming the field. A transport whose request Struct
    is its own builds one with keyword arguments from values its Struct has already
    checked (see `corral.protocol.openai`).

    Exactly one of `prompt` (text or token ids) and `messages` (chat turns) is given.
    `tools`, `tool_choice` and `parallel_tool_calls` go with `messages`, as OpenAI's
    function calling has them (`runtime/tools.py`).
    `client` names who asks, for fair admission (see `Admit`); a transport sets it to
    the connection or address the request came from, whatever the request said.
    `response_format` (OpenAI's shapes) constrains the output; the runtime writes the
    grammar the engine enforces and checks that it compiles (GuidanceError otherwise)
    before admission.
    `n` choices run as `n` sequences (and take `n` stream slots); see
    `corral.runtime.choices`.
    `generated` continues a generation another server lost (the ids it already sent,
    after the prompt): the engine starts after them as a worker restart does, so the
    text, a seeded sampler's draws, penalties and a grammar pick up where they stopped;
    they count toward `max_tokens` and are not sent again. Prompt only, one choice, no
    tools.
    `keep_alive` (seconds; 0: unload right after, negative: for good) is how long the
    model stays loaded once idle after this request; None leaves the model's own
    (`generation.models[].keep_alive`). See `corral.runtime.keep_alive`.
    `priority`: while requests wait for a stream slot, a lower value is admitted first
    (vLLM's `priority`); within one priority admission stays fair between clients (see
    `Admit`). A running stream is never preempted.
    `chat_template_kwargs` go with `messages`: more variables for the model's chat
    template (see `ChatTemplateKwargs`).
    `separate_reasoning`: of a chat with a model that thinks, the text between its
    think markers is read apart, as `reasoning` (`corral.runtime.reasoning`); false
    leaves it in the text with its markers (for an API whose replies have no place for
    it yet).
    """

    model: Name | None = None
    prompt: str | list[TokenId] | None = None
    messages: list[ChatMessage] | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    n: ChoiceCount = 1
    timeout_ms: TimeoutMs | None = None
    request_id: Name | None = None
    client: Name | None = None
    generated: list[TokenId] = msgspec.field(default_factory=list)
    keep_alive: KeepAliveSeconds | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    priority: Priority = 0
    separate_reasoning: bool = True

    positional_fields: ClassVar[tuple[str, ...]] = (
        "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k",
        "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "logit_bias", "seed", "stop", "stop_token_ids", "logprobs", "tools",
        "tool_choice", "parallel_tool_calls", "response_format", "top_logprobs", "n",
        "timeout_ms", "request_id", "client", "generated", "keep_alive")
    """The order JSON-RPC's positional params fill fields in: the order of the first
    release, kept; fields added since follow, in declaration order (`params_as`)."""


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
    reasoning: str | None = None
    """Of a chat with a model that thinks: the text between its think markers (then
    not in `text`); else None."""


class Completion(msgspec.Struct, frozen=True):
    """The whole result of a non-streaming call: the first choice's fields (the whole
    answer when `n` is 1), and every choice in `choices`. `usage` counts the prompt once
    and the tokens of every choice. `fallback` names
    what served it in place of the model asked for (another alias, "cached",
    "default"), else None. `reasoning`: the first choice's (see `Choice`)."""

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
    reasoning: str | None = None
