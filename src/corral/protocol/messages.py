"""Actor messages and lifecycle events: frozen msgspec Structs, no behaviour.

Messages an actor accepts are tagged Structs gathered in a Union that the actor names as
its `Message`; a message that expects an answer names its reply type in the class
variable `reply_type`, so `ask` decodes the reply with the right schema.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec

from corral.protocol.grammar import ResponseFormat, response_format_grammar

ExitKind = Literal["normal", "shutdown", "error"]


class ExitReason(msgspec.Struct, frozen=True):
    """Why an actor incarnation ended.

    `normal`: its run returned; `shutdown`: its supervisor stopped or killed it;
    `error`: it raised `error` (the exception type) with `message`.
    """

    kind: ExitKind
    error: str = ""
    message: str = ""

    @property
    def abnormal(self) -> bool:
        return self.kind == "error"

    def describe(self) -> str:
        if self.kind != "error":
            return self.kind
        return f"{self.error}: {self.message}" if self.message else self.error

    @classmethod
    def from_exception(cls, exc: BaseException) -> ExitReason:
        exc = innermost(exc)
        return cls("error", type(exc).__name__, str(exc))


def innermost(exc: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups (trio nurseries
    wrap what their tasks raise), or `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


NORMAL = ExitReason("normal")
SHUTDOWN = ExitReason("shutdown")
KILLED = ExitReason("error", "Killed", "killed by its supervisor on request")

LifecycleKind = Literal["started", "exited", "restarting", "restarted", "stopped",
                        "intensity_exceeded", "start_failed"]


class LifecycleEvent(msgspec.Struct, frozen=True, tag=True):
    """One supervision event, sent to structlog and to every system listener (metrics).

    `time` is trio's clock, so tests on a MockClock see mock time.
    """

    kind: LifecycleKind
    path: str
    time: float
    reason: ExitReason | None = None
    attempt: int = 0
    delay_s: float = 0.0


class Pong(msgspec.Struct, frozen=True, tag=True):
    seq: int = 0


class Ping(msgspec.Struct, frozen=True, tag=True):
    """A liveness probe; the answer is `Pong` with the same `seq`."""

    seq: int = 0
    reply_type: ClassVar[type[Pong]] = Pong


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


class ToolFunction(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A function the model may call; `parameters` is its arguments' JSON schema."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
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


# -- model actor messages --------------------------------------------------------------


class Accepted(msgspec.Struct, frozen=True, tag=True):
    seq_id: int


class Submit(msgspec.Struct, frozen=True, tag=True):
    """Start (or resume) a sequence; answered once the engine has it queued. Also the
    frame that hands a sequence, already validated, to a worker process (no answer)."""

    seq: EngineSequence
    reply_type: ClassVar[type[Accepted]] = Accepted


class CancelSequence(msgspec.Struct, frozen=True, tag=True):
    """Remove a sequence from the batch before the next step. Unknown ids are ignored."""

    seq_id: int


class EngineFailed(msgspec.Struct, frozen=True, tag=True):
    """The engine thread or worker died; the model actor crashes so its supervisor acts."""

    error: str


class EngineLoaded(msgspec.Struct, frozen=True, tag=True):
    info: ModelInfo


class Ready(msgspec.Struct, frozen=True, tag=True):
    alias: str
    info: ModelInfo


class WaitReady(msgspec.Struct, frozen=True, tag=True):
    """Answered with `Ready` once the model is loaded, or the load's typed error."""

    reply_type: ClassVar[type[Ready]] = Ready


class TokenIds(msgspec.Struct, frozen=True, tag=True):
    ids: list[int]


class Text(msgspec.Struct, frozen=True, tag=True):
    text: str


class Tokenize(msgspec.Struct, frozen=True, tag=True):
    text: str
    add_special_tokens: bool = True
    reply_type: ClassVar[type[TokenIds]] = TokenIds


class Detokenize(msgspec.Struct, frozen=True, tag=True):
    ids: list[int]
    reply_type: ClassVar[type[Text]] = Text


class ApplyChatTemplate(msgspec.Struct, frozen=True, tag=True):
    """Render chat turns (and the tools, when given) with the model's chat template.
    Turns and tools are the template's free-form mappings (`runtime/tools.py` makes
    them from `ChatMessage` and `Tool`)."""

    turns: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    reply_type: ClassVar[type[TokenIds]] = TokenIds


class Sequences(msgspec.Struct, frozen=True, tag=True):
    seq_ids: list[int]


class ListSequences(msgspec.Struct, frozen=True, tag=True):
    """Which sequences the engine runs now (reconciliation after a registry restart)."""

    reply_type: ClassVar[type[Sequences]] = Sequences


FaultKind = Literal["raise", "hang", "stuck", "slow", "exit", "segfault"]
"""Test hooks: the engine's next step raises or hangs (until it is closed); "stuck" makes
it block for 2 s whatever happens, as a step in a call that does not return; "slow" makes
every later step take 10 ms more per prompt token it prefills, as a slow machine would;
in process isolation the whole worker also ends, with `os._exit(3)` ("exit") or a real
SIGSEGV ("segfault")."""


class InjectFault(msgspec.Struct, frozen=True, tag=True):
    """Test hook: break the engine (see `FaultKind`). A model actor's message, and the
    frame that carries it on to a worker process."""

    kind: FaultKind


# -- stream registry messages ------------------------------------------------------------


class Admitted(msgspec.Struct, frozen=True, tag=True):
    stream_id: int
    deadline: float


class Admit(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Ask for a stream slot; waits in the queue when all slots run, or Overloaded.

    On admission the registry opens the stream's buffer (with the sequence to submit)
    in the stream table, in the same step, so no stream is ever admitted untracked.
    `stream_id` comes from the table (the caller's, so it can close what it asked for).
    `client` names who asked (a connection, an address), for fair admission: a freed
    slot goes to the waiting client with the fewest streams running, and a full queue
    makes room by refusing the newest waiter of the client that holds the most. None
    is one anonymous client. `generated`: ids a lost run already sent (see
    `GenerateParams`); `max_tokens` is what is left after them.
    """

    stream_id: int
    model: str
    timeout_s: float
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    request_id: str | None = None
    client: str | None = None
    generated: list[int] = []
    reply_type: ClassVar[type[Admitted]] = Admitted


class ModelOutput(msgspec.Struct, frozen=True, tag=True):
    """One engine step's tokens of one model, forwarded by its model actor."""

    model: str
    step: int
    outputs: list[TokenOut]


class CloseStream(msgspec.Struct, frozen=True, tag=True):
    """The client is done with a stream (read to the end, cancelled, or gone)."""

    stream_id: int
    reason: FinishReason


class ModelDown(msgspec.Struct, frozen=True, tag=True):
    """A model actor exited; its streams cannot continue on that incarnation.
    `unloaded`: the model was unloaded, so they cannot continue at all."""

    model: str
    reason: ExitReason
    unloaded: bool = False


class Reconcile(msgspec.Struct, frozen=True, tag=True):
    """A model's running sequences, as it answered a restarted registry."""

    model: str
    running: list[int]


class DeadlinesDue(msgspec.Struct, frozen=True, tag=True):
    now: float


class RegistryState(msgspec.Struct, frozen=True, tag=True):
    active: int
    queued: int
    streams: dict[int, str]


class GetRegistryState(msgspec.Struct, frozen=True, tag=True):
    reply_type: ClassVar[type[RegistryState]] = RegistryState


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

_Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]  # OpenAI's range
_Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]  # OpenAI's range
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
"""A sampling temperature (0 is greedy), in OpenAI's range."""
Probability = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
"""A probability mass that cannot be empty (top_p)."""
MAX_TOOLS: Final = 128
"""The most tools one request may give."""
_Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


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
    """

    model: Name | None = None
    prompt: str | list[TokenId] | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature = 0.0
    top_p: Probability = 1.0
    top_k: TopK = 0
    min_p: _Fraction = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    logit_bias: Annotated[dict[TokenId, _Bias], msgspec.Meta(max_length=1024)] = {}
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString],
                                 msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[TokenId] = []
    logprobs: bool = False
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    top_logprobs: TopLogprobs = 0
    n: ChoiceCount = 1
    timeout_ms: TimeoutMs | None = None
    request_id: Name | None = None
    client: Name | None = None
    generated: list[TokenId] = []

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
