"""OpenAI-compatible HTTP bodies: requests, responses, SSE chunks and error bodies.

Requests decode into these Structs, and decoding is the validation: an unknown field
is InvalidParams naming it. Fields that OpenAI clients send with neutral values by
default (`best_of`, `echo`, `user`, `stream_options`) are accepted; any value
other than the neutral one fails validation, since corral would silently ignore it.
`presence_penalty`, `frequency_penalty`, `logit_bias`, `n` (1 to 8), chat
`top_logprobs`, completions `logprobs` (0 to 20) and `response_format` (json_object
and json_schema, by constrained decoding) are applied. `top_k`, `min_p`,
`repetition_penalty` and `stop_token_ids` are accepted as extensions, as vLLM does, and
`timeout_ms`, the request's deadline.
Ranges of sampling values are checked once, by `GenerateParams`, which names the same
fields; only the token counts are bounded here too, so that `max_completion_tokens` is
named as the client sent it. This module holds data only; `server/openai.py` maps it
to and from the runtime.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from corral.protocol.grammar import ResponseFormat
from corral.protocol.messages import (
    ChoiceCount,
    FunctionCall,
    TokenCount,
    Tool,
    ToolCall,
    ToolChoice,
    TopLogprobs,
    Usage,
)

_One = Annotated[int, msgspec.Meta(ge=1, le=1)]

NEUTRAL_ONLY: Final[dict[str, str]] = {
    "best_of": "1", "echo": "false", "suffix": "null",
}
"""Fields accepted with their neutral value only, and that value, for error messages."""


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`include_usage`: send a last chunk with no choices and the request's usage."""

    include_usage: bool = False


class _Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: TokenCount | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: ChoiceCount = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    response_format: ResponseFormat | None = None
    user: str | None = None  # neutral: accepted, not used
    # Extensions, as vLLM accepts them.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    timeout_ms: int | None = None


class CompletionRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/completions.

    `prompt` is a string or token ids (a list of one string is taken as that string);
    batched prompts are refused. `logprobs` N: the sampled tokens' log-probabilities and
    the N most likely alternatives of each (0: none).
    """

    prompt: str | list[str | int]
    logprobs: TopLogprobs | None = None
    echo: Literal[False] = False
    best_of: _One | None = None
    suffix: None = None


class TextPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class ChatMessageIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A chat turn; `developer` is taken as `system`, text parts are joined, and no
    content (an assistant turn that only calls tools) is empty text."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatCompletionRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/chat/completions. `max_completion_tokens` wins over `max_tokens`;
    `top_logprobs` needs `logprobs`, as OpenAI's does."""

    messages: list[ChatMessageIn]
    max_completion_tokens: TokenCount | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None


# -- responses ---------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct, frozen=True):
    """`cached_tokens`: prompt tokens served from the prefix cache, as OpenAI reports."""

    cached_tokens: int


class UsageInfo(msgspec.Struct, frozen=True):
    """OpenAI's `usage`; JSON-RPC's `complete` and `stream.end` report the same shape."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, usage: Usage) -> UsageInfo:
        """The counts of `usage` in OpenAI's shape."""
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
                   PromptTokensDetails(usage.cached_tokens))


class CompletionLogprobs(msgspec.Struct, frozen=True):
    """Each token decoded alone; `top_logprobs` (when asked for) maps the alternatives'
    tokens to their log-probabilities, best first; `text_offset` is where each token's
    text starts, counting the tokens decoded alone before it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, frozen=True):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(msgspec.Struct, frozen=True):
    """A whole completion, or (`usage` None until the last) one SSE chunk of one."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    object: Literal["text_completion"] = "text_completion"


class ChatTopLogprob(msgspec.Struct, frozen=True):
    """An alternative: the token decoded alone, and its UTF-8 bytes."""

    token: str
    logprob: float | None
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct, frozen=True):
    """A sampled token, as `ChatTopLogprob`, with its alternatives, best first."""

    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(msgspec.Struct, frozen=True):
    content: list[ChatTokenLogprob]


class ChatMessageOut(msgspec.Struct, frozen=True):
    """The reply; `content` is None when the model only called tools."""

    content: str | None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[ToolCall] | None = None


class ChatChoice(msgspec.Struct, frozen=True):
    message: ChatMessageOut
    finish_reason: str
    index: int = 0
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(msgspec.Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    object: Literal["chat.completion"] = "chat.completion"


class ToolCallDelta(msgspec.Struct, frozen=True):
    """A streamed tool call: each is sent whole, in one delta, at its `index`."""

    index: int
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct, frozen=True):
    delta: ChatDelta
    index: int = 0
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class ModelCard(msgspec.Struct, frozen=True):
    """One entry of GET /v1/models; `state` and `breaker` are corral's additions."""

    id: str
    created: int
    root: str
    max_model_len: int | None
    state: str
    breaker: str
    owned_by: str = "corral"
    object: Literal["model"] = "model"


class ModelDeleted(msgspec.Struct, frozen=True):
    """The answer of POST /v1/models/unload, in the shape of OpenAI's model deletion."""

    id: str
    deleted: bool = True
    object: Literal["model"] = "model"


class ModelList(msgspec.Struct, frozen=True):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorDetail(msgspec.Struct, frozen=True):
    """OpenAI's error object; `code` is corral's code name from the error table.

    `details` are the error's structured fields, the same as JSON-RPC's `error.data`
    carries (a Timeout's `method`, `timeout`, `duration` and `request_id`; an open
    circuit's `retry_after_ms`; ...), empty when the error has none.
    """

    message: str
    type: str
    code: str
    param: str | None
    request_id: str
    retryable: bool
    details: dict[str, object] = msgspec.field(default_factory=dict)


class ErrorBody(msgspec.Struct, frozen=True):
    """Every HTTP error body, and the last SSE event of a stream that failed."""

    error: ErrorDetail
