"""The OpenAI API's side of the HTTP transport: jobs (a request body as one typed
`GenerateParams`), response shapes (bodies and SSE chunks), and the mapping from
corral's errors to HTTP statuses, error bodies and headers.

Pure functions and small objects over `protocol/openai.py`'s Structs: this module never
does I/O, never knows of ASGI or Starlette, and never calls the runtime (a shape only
reads a stream that has ended).
"""

from __future__ import annotations

import collections
import itertools
import math
import time
from collections.abc import Sequence
from typing import Any, Final, Literal, TypeAlias, final

import msgspec

from corral.protocol.codec import convert_params
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.messages import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerateParams,
    TokenLogprob,
    Usage,
)
from corral.protocol.openai import (
    NEUTRAL_ONLY,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorDetail,
    TextPart,
    ToolCallDelta,
    UsageInfo,
)
from corral.runtime.stream_buffers import StreamChunk

__all__ = ["ChatShape", "CompletionShape", "Job", "Shape", "chat_job", "completion_job",
           "drain_wait_ms", "error_body", "error_headers", "explained", "finish_reason",
           "internal_error", "retry_after", "status_of", "with_drain_wait"]

_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    499: "cancelled",
}


# -- errors ---------------------------------------------------------------------------


def status_of(error: CorralError) -> int:
    """The HTTP status of an error: the table's, except 503 while the server shuts down
    (the table has no code of its own for that; the error is a retryable ServerError),
    408 for a request body that did not arrive in time (the client's Timeout), 413 for
    one over `server.max_body_bytes` (InvalidRequest), 401 for an admin request without
    the right key (InvalidRequest, `details.unauthorized`), and 400 for a model load
    that retrying cannot fix (a path that leads to no model, or a model the engine
    cannot load): the caller's choice of model, not a server fault."""
    if error.details.get("shutting_down"):
        return 503
    if "body_timeout_ms" in error.details:
        return 408
    if "max_body_bytes" in error.details:
        return 413
    if error.details.get("unauthorized"):
        return 401
    if error.code is Code.MODEL_LOAD_ERROR and error.retryable is False:
        return 400
    return error.spec.http


def error_body(error: CorralError, request_id: str) -> ErrorBody:
    """OpenAI's error body for `error`, with corral's code name, the request id and the
    error's structured details."""
    status = status_of(error)
    field = error.details.get("field")
    return ErrorBody(ErrorDetail(
        message=error.message,
        type=_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        code=error.code.value, param=field if isinstance(field, str) else None,
        request_id=request_id, retryable=error.retryable,
        # A detail with no JSON form goes as its repr, as in JSON-RPC's error data.
        details=msgspec.to_builtins(error.details, enc_hook=repr)))


def error_headers(error: CorralError) -> list[tuple[bytes, bytes]]:
    """Retry-After (whole seconds, rounded up) for the errors that carry a wait;
    Connection: close after a body that did not arrive in time or was too large (its
    rest may follow, unread)."""
    headers = []
    retry_after_ms = error.details.get("retry_after_ms")
    if (error.code in (Code.OVERLOADED, Code.CIRCUIT_OPEN) or error.details.get(
            "shutting_down")) and isinstance(retry_after_ms, int | float):
        headers.append(retry_after(retry_after_ms))
    if "body_timeout_ms" in error.details or "max_body_bytes" in error.details:
        headers.append((b"connection", b"close"))
    return headers


def retry_after(ms: float) -> tuple[bytes, bytes]:
    """The Retry-After header for a wait of `ms`: whole seconds, rounded up."""
    return (b"retry-after", str(max(0, math.ceil(ms / 1000.0))).encode())


def drain_wait_ms(drain_ms: int) -> int:
    """The wait a draining server's 503 tells: the drain's length (at least a second),
    the earliest a restarted server could answer at this address."""
    return max(drain_ms, 1000)


def with_drain_wait(error: CorralError, drain_ms: int) -> CorralError:
    """A shutting-down error with the wait its 503 tells the client; any other error
    as it is."""
    if not error.details.get("shutting_down") or "retry_after_ms" in error.details:
        return error
    return EngineClientError(error.code, error.message,
                             {**error.details, "retry_after_ms": drain_wait_ms(drain_ms)},
                             retryable=error.retryable)


def internal_error(exc: BaseException) -> CorralError:
    """What a client is told of a bug in the HTTP server: its type only."""
    return EngineClientError(Code.INTERNAL_ERROR,
                             f"internal error in the HTTP server: {type(exc).__name__}")


def explained(error: CorralError) -> CorralError:
    """Say what is supported for the fields accepted with their neutral value only."""
    field = error.details.get("field")
    if error.code is Code.INVALID_PARAMS and field in NEUTRAL_ONLY:
        return EngineClientError(Code.INVALID_PARAMS,
                                 f"{field}: not supported; only {NEUTRAL_ONLY[field]} is",
                                 error.details)
    return error


# -- jobs -----------------------------------------------------------------------------


def _sampling(request: ChatCompletionRequest | CompletionRequest,
              max_tokens: int | None) -> dict[str, Any]:
    """The `GenerateParams` fields that both APIs share, as the client sent them;
    `GenerateParams` checks their ranges and names the field."""
    params = {"model": request.model, "max_tokens": max_tokens,
              "temperature": request.temperature, "top_p": request.top_p,
              "top_k": request.top_k, "min_p": request.min_p,
              "repetition_penalty": request.repetition_penalty,
              "presence_penalty": request.presence_penalty,
              "frequency_penalty": request.frequency_penalty,
              "logit_bias": _logit_bias(request.logit_bias), "seed": request.seed,
              "n": request.n,
              "stop": request.stop, "stop_token_ids": request.stop_token_ids,
              "response_format": request.response_format, "timeout_ms": request.timeout_ms}
    return {key: value for key, value in params.items() if value is not None}


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `logit_bias` (token ids as JSON object keys) keyed by token id.

    Raises:
        EngineClientError: InvalidParams when a key is not a token id.
    """
    if bias is None:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise EngineClientError(Code.INVALID_PARAMS,
                                "logit_bias: keys must be token ids, as decimal strings",
                                {"field": "logit_bias"}) from None


def _text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _prompt(prompt: str | list[str | int]) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    ids = [item for item in prompt if isinstance(item, int)]
    if len(ids) != len(prompt):
        raise EngineClientError(Code.INVALID_PARAMS,
                                "prompt: batched prompts are not supported; send one string "
                                "or one list of token ids per request", {"field": "prompt"})
    return ids


class Job(msgspec.Struct, frozen=True):
    """One validated generation request: the runtime's params and the reply's shape.

    Attributes:
        params: what the runtime runs, with the request id and the client set.
        shape: makes the reply's bodies or chunks.
        stream: whether the reply is SSE.
        include_usage: SSE only: a last chunk with the usage.
    """

    params: GenerateParams
    shape: Shape
    stream: bool
    include_usage: bool


def chat_job(body: Any, request_id: str, client: str) -> Job:
    """A POST /v1/chat/completions body (builtins) as a job.

    Raises:
        EngineClientError: InvalidParams naming the field (`top_logprobs` without
            `logprobs` included, as OpenAI refuses it).
    """
    request = convert_params(body, ChatCompletionRequest)
    if request.top_logprobs and not request.logprobs:
        raise EngineClientError(Code.INVALID_PARAMS,
                                "top_logprobs: needs logprobs to be true",
                                {"field": "top_logprobs"})
    messages = [ChatMessage(role="system" if m.role == "developer" else m.role,
                            content=_text(m.content), tool_calls=m.tool_calls or [],
                            tool_call_id=m.tool_call_id, name=m.name)
                for m in request.messages]
    params = _sampling(request, request.max_completion_tokens or request.max_tokens)
    tools = {"tools": request.tools, "tool_choice": request.tool_choice,
             "parallel_tool_calls": request.parallel_tool_calls}
    params.update({key: value for key, value in tools.items() if value is not None})
    options = request.stream_options
    return Job(convert_params({**params, "messages": messages, "logprobs": request.logprobs,
                               "top_logprobs": request.top_logprobs or 0,
                               "request_id": request_id, "client": client}, GenerateParams),
               ChatShape(f"chatcmpl-{request_id}", int(time.time())), request.stream,
               bool(options and options.include_usage))


def completion_job(body: Any, request_id: str, client: str) -> Job:
    """A POST /v1/completions body (builtins) as a job.

    Raises:
        EngineClientError: InvalidParams naming the field (batched prompts included).
    """
    request = convert_params(body, CompletionRequest)
    params = _sampling(request, request.max_tokens)
    options = request.stream_options
    return Job(convert_params({**params, "prompt": _prompt(request.prompt),
                               "logprobs": request.logprobs is not None,
                               "top_logprobs": request.logprobs or 0,
                               "request_id": request_id, "client": client}, GenerateParams),
               CompletionShape(f"cmpl-{request_id}", int(time.time())), request.stream,
               bool(options and options.include_usage))


def finish_reason(reason: FinishReason | None) -> Literal["stop", "length", "tool_calls"]:
    """The OpenAI finish reason of a choice that ended without an error.

    Raises:
        EngineClientError: Cancelled, when the runtime ended it (an unloaded model).
    """
    if reason == "stop" or reason == "length" or reason == "tool_calls":
        return reason
    raise EngineClientError(Code.CANCELLED, f"the generation ended early: {reason}",
                            {"finish_reason": reason})


# -- response shapes ------------------------------------------------------------------


def _clean(logprobs: Sequence[float]) -> list[float | None]:
    return [None if math.isnan(value) else value for value in logprobs]


def _utf8(token: str) -> list[int]:
    return list(token.encode())


@final
class ChatShape:
    """Chat completion bodies and chunks of one request."""

    def __init__(self, response_id: str, created: int) -> None:
        self._id = response_id
        self._created = created
        self._calls: collections.Counter[int] = collections.Counter()  # streamed, per choice

    @staticmethod
    def _logprobs(logprobs: Sequence[float] | None, tokens: Sequence[str] | None,
                  top: Sequence[list[TokenLogprob]] | None) -> ChatLogprobs | None:
        if logprobs is None or tokens is None:
            return None
        alternatives = top if top is not None else [[] for _ in tokens]
        return ChatLogprobs([
            ChatTokenLogprob(token, value, _utf8(token), [
                ChatTopLogprob(alt.token, alt.logprob, _utf8(alt.token)) for alt in alts])
            for token, value, alts in zip(tokens, _clean(logprobs), alternatives, strict=True)])

    def _chunk(self, model: str, choices: list[ChatChunkChoice],
               usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(self._id, self._created, model, choices, usage)

    def opening(self, model: str, n: int) -> list[msgspec.Struct]:
        """The events before the first token: the assistant's role, for every choice."""
        return [self._chunk(model, [ChatChunkChoice(ChatDelta(role="assistant", content=""),
                                                    index) for index in range(n)])]

    def chunk(self, model: str, chunk: StreamChunk) -> msgspec.Struct | None:
        """The event of one chunk, or None for a chunk with nothing to tell."""
        if not chunk.text and chunk.logprobs is None and not chunk.tool_calls:
            return None
        calls = None
        if chunk.tool_calls:
            sent = self._calls[chunk.choice]
            calls = [ToolCallDelta(sent + i, call.id, call.function)
                     for i, call in enumerate(chunk.tool_calls)]
            self._calls[chunk.choice] += len(calls)
        return self._chunk(model, [ChatChunkChoice(
            ChatDelta(content=chunk.text or (None if calls else ""), tool_calls=calls),
            chunk.choice,
            logprobs=self._logprobs(chunk.logprobs, chunk.tokens, chunk.top_logprobs))])

    def ending(self, model: str, choice: int, finish: str) -> msgspec.Struct:
        """The event that ends one choice, with its finish reason."""
        return self._chunk(model, [ChatChunkChoice(ChatDelta(), choice, finish_reason=finish)])

    def usage(self, model: str, usage: Usage) -> msgspec.Struct:
        """The last event, when asked for: no choices, the usage."""
        return self._chunk(model, [], UsageInfo.of(usage))

    def whole(self, completion: Completion) -> msgspec.Struct:
        """The body of a reply that is not streamed.

        Raises:
            EngineClientError: Cancelled, for a choice the runtime ended early.
        """
        choices = [ChatChoice(ChatMessageOut(None if c.tool_calls and not c.text else c.text,
                                             tool_calls=c.tool_calls or None),
                              finish_reason(c.finish_reason), c.index,
                              self._logprobs(c.logprobs, c.tokens, c.top_logprobs))
                   for c in completion.choices]
        return ChatCompletionResponse(self._id, self._created, completion.model, choices,
                                      UsageInfo.of(completion.usage))


@final
class CompletionShape:
    """Text completion bodies and chunks of one request (as `ChatShape`'s)."""

    def __init__(self, response_id: str, created: int) -> None:
        self._id = response_id
        self._created = created
        self._offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def _logprobs(self, choice: int, logprobs: Sequence[float] | None,
                  tokens: Sequence[str] | None,
                  top: Sequence[list[TokenLogprob]] | None) -> CompletionLogprobs | None:
        if logprobs is None or tokens is None:
            return None
        offsets = list(itertools.accumulate((len(token) for token in tokens),
                                            initial=self._offsets.get(choice, 0)))
        self._offsets[choice] = offsets.pop()
        return CompletionLogprobs(
            list(tokens), _clean(logprobs),
            None if top is None else [{alt.token: alt.logprob for alt in alts}
                                      for alts in top],
            offsets)

    def _body(self, model: str, choices: list[CompletionChoice],
              usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(self._id, self._created, model, choices, usage)

    def opening(self, model: str, n: int) -> list[msgspec.Struct]:
        return []

    def chunk(self, model: str, chunk: StreamChunk) -> msgspec.Struct | None:
        if not chunk.text and chunk.logprobs is None:
            return None
        return self._body(model, [CompletionChoice(chunk.text, chunk.choice, self._logprobs(
            chunk.choice, chunk.logprobs, chunk.tokens, chunk.top_logprobs))])

    def ending(self, model: str, choice: int, finish: str) -> msgspec.Struct:
        return self._body(model, [CompletionChoice("", choice, finish_reason=finish)])

    def usage(self, model: str, usage: Usage) -> msgspec.Struct:
        return self._body(model, [], UsageInfo.of(usage))

    def whole(self, completion: Completion) -> msgspec.Struct:
        choices = [CompletionChoice(c.text, c.index, self._logprobs(
                       c.index, c.logprobs, c.tokens, c.top_logprobs),
                       finish_reason(c.finish_reason)) for c in completion.choices]
        return self._body(completion.model, choices, UsageInfo.of(completion.usage))


Shape: TypeAlias = ChatShape | CompletionShape
"""What a job's reply is made by: a chat or a text completion."""
