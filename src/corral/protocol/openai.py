"""OpenAI-compatible HTTP bodies: requests, responses, SSE chunks and error bodies.

Requests decode into these Structs, and decoding is the validation: an unknown field
is InvalidParams naming it. Fields that OpenAI clients send with neutral values by
default (`best_of`, `suffix`, `user`, `stream_options`) are accepted; any value
other than the neutral one fails validation, since corral would silently ignore it.
The sampling fields are `SamplingParams`'s, inherited with their ranges (so a knob
added there is accepted here with the same bounds): `presence_penalty`,
`frequency_penalty`, `logit_bias`, `n` (1 to 8), chat `top_logprobs`, completions
`logprobs` (0 to 20) and `response_format` (json_object and json_schema, by
constrained decoding) as OpenAI has them, and `top_k`, `min_p`, `repetition_penalty`
and `stop_token_ids` as extensions, as vLLM accepts them, and `timeout_ms`, the
request's deadline. A null top-level sampling field is taken as absent, as OpenAI
takes it (`without_nulls`). Each request converts itself (`to_generate_params`); this
module holds data only, and `server/openai.py` maps replies.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.grammar import ResponseFormat
from corral.protocol.messages import (
    ChatMessage,
    ChatTemplateKwargs,
    ChoiceCount,
    FunctionCall,
    GenerateParams,
    Name,
    Priority,
    TimeoutMs,
    TokenCount,
    TokenId,
    ToolCall,
    ToolChoice,
    Tools,
    TopLogprobs,
    Usage,
)
from corral.protocol.sampling import SamplingParams

_One = Annotated[int, msgspec.Meta(ge=1, le=1)]

MAX_BATCH_SEQUENCES: Final = 16
"""The most sequences one completions request runs: its prompts times `n`."""

NEUTRAL_ONLY: Final[dict[str, str]] = {
    "best_of": "1", "suffix": "null (no fill-in-the-middle: no model's template or "
    "tokenizer here declares a format for it)",
}
"""Fields accepted with their neutral value only, and that value, for error messages."""


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`include_usage`: send a last chunk with no choices and the request's usage."""

    include_usage: bool = False


def without_nulls(body: Any) -> Any:
    """A request body with its null sampling fields left out: OpenAI takes a null
    optional parameter as absent, and clients send them so."""
    if not isinstance(body, dict):
        return body
    return {key: value for key, value in body.items()
            if value is not None or key not in SamplingParams.__struct_fields__}


class _Request(SamplingParams, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What completions and chat completions share: the sampling fields, and these."""

    model: Name | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: ChoiceCount = 1
    response_format: ResponseFormat | None = None
    user: str | None = None  # neutral: accepted, not used
    timeout_ms: TimeoutMs | None = None  # an extension: the request's deadline
    priority: Priority = 0  # an extension, as vLLM's: lower is admitted first

    def _generate_params(self, request_id: str, client: str, **fields: Any) -> GenerateParams:
        """The runtime's request: this request's sampling, with `fields` over it."""
        return GenerateParams(
            **{**self.sampling_fields(), **fields},
            model=self.model, n=self.n, response_format=self.response_format,
            timeout_ms=self.timeout_ms, priority=self.priority, request_id=request_id,
            client=client)


class CompletionRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/completions.

    `prompt` is a string, token ids, or a batch: a list of strings or of token id
    lists, one choice per prompt (`n` per prompt, prompt by prompt, as OpenAI orders
    them), at most `MAX_BATCH_SEQUENCES` sequences in all. `echo`: the prompt's text
    comes before the completion's (without the prompt's log-probabilities, which are
    refused). `logprobs` N: the sampled tokens' log-probabilities and the N most likely
    alternatives of each (0: none); `top_logprobs` is chat's, refused here.
    """

    prompt: str | list[str | TokenId | list[TokenId]]
    logprobs: TopLogprobs | None = None  # type: ignore[assignment]
    top_logprobs: None = None  # type: ignore[assignment]
    echo: bool = False
    best_of: _One | None = None
    suffix: None = None

    def to_generate_batch(self, *, request_id: str, client: str) -> list[GenerateParams]:
        """The runtime's requests, one per prompt, with the request's id and the
        client's address.

        Raises:
            EngineClientError: InvalidParams for a list mixing strings and token ids,
                a batch of more than `MAX_BATCH_SEQUENCES` sequences, or `echo` with
                `logprobs`.
        """
        prompts = _prompts(self.prompt)
        if len(prompts) * self.n > MAX_BATCH_SEQUENCES:
            raise EngineClientError(
                Code.INVALID_PARAMS, f"prompt: {len(prompts)} prompts of n={self.n} choices "
                f"each; a batch runs at most {MAX_BATCH_SEQUENCES} sequences",
                {"field": "prompt"})
        if self.echo and self.logprobs is not None:
            raise EngineClientError(Code.INVALID_PARAMS, "echo: the prompt's log-probabilities "
                                    "are not supported; echo without logprobs",
                                    {"field": "echo"})
        return [self._generate_params(request_id, client, prompt=prompt,
                                      logprobs=self.logprobs is not None,
                                      top_logprobs=self.logprobs or 0)
                for prompt in prompts]


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

    def to_message(self) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role,
                           content=_text(self.content), tool_calls=self.tool_calls or [],
                           tool_call_id=self.tool_call_id, name=self.name)


class ChatCompletionRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/chat/completions. `max_completion_tokens` wins over `max_tokens`;
    `top_logprobs` needs `logprobs`, as OpenAI's does."""

    messages: list[ChatMessageIn]
    max_completion_tokens: TokenCount | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None  # an extension, as vLLM's

    def to_generate_params(self, *, request_id: str, client: str) -> GenerateParams:
        """The runtime's request, with the request's id and the client's address.

        Raises:
            EngineClientError: InvalidParams for `top_logprobs` without `logprobs`, as
                OpenAI refuses it.
        """
        if self.top_logprobs and not self.logprobs:
            raise EngineClientError(Code.INVALID_PARAMS,
                                    "top_logprobs: needs logprobs to be true",
                                    {"field": "top_logprobs"})
        return self._generate_params(
            request_id, client, messages=[m.to_message() for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens, tools=self.tools,
            tool_choice=self.tool_choice, chat_template_kwargs=self.chat_template_kwargs,
            parallel_tool_calls=(True if self.parallel_tool_calls is None
                                 else self.parallel_tool_calls))


def _text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _prompts(prompt: str | list[str | int | list[int]]) -> list[str | list[int]]:
    """The prompts of a completion: one string or one list of ids, or a batch of
    either (OpenAI's four shapes)."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(item, int) for item in prompt):
        return [[item for item in prompt if isinstance(item, int)]]
    texts = [item for item in prompt if isinstance(item, str)]
    ids = [item for item in prompt if isinstance(item, list)]
    if len(texts) != len(prompt) and len(ids) != len(prompt):
        raise EngineClientError(Code.INVALID_PARAMS,
                                "prompt: expected a string, a list of token ids, or a list "
                                "of either alone", {"field": "prompt"})
    return [*texts, *ids]


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
    """The reply; `content` is None when the model only called tools.
    `reasoning_content` (vLLM's name) is what a model that thinks wrote between its
    think markers, else None."""

    content: str | None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


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
    reasoning_content: str | None = None


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
