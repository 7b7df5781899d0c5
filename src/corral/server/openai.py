"""The OpenAI API's side of the HTTP transport: jobs (a request body as one typed
`GenerateParams`, which the request Struct converts itself to), response shapes
(bodies and SSE chunks), and OpenAI's error body (statuses and headers are every
API's, `errors.py`).

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
    ToolCallDelta,
    UsageInfo,
    without_nulls,
)
from corral.runtime.stream_buffers import StreamChunk
from corral.server.errors import ErrorShape, status_of

__all__ = ["OPENAI_ERRORS", "ChatShape", "CompletionShape", "Job", "Shape", "chat_job",
           "completion_job", "error_body", "explained", "finish_reason"]

_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    499: "cancelled",
}


# -- errors ---------------------------------------------------------------------------


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


OPENAI_ERRORS: Final = ErrorShape(error_body)
"""corral's errors as the OpenAI API tells them; mid-stream, as a bare `data:` event."""


def explained(error: CorralError) -> CorralError:
    """Say what is supported for the fields accepted with their neutral value only."""
    field = error.details.get("field")
    if error.code is Code.INVALID_PARAMS and field in NEUTRAL_ONLY:
        return EngineClientError(Code.INVALID_PARAMS,
                                 f"{field}: not supported; only {NEUTRAL_ONLY[field]} is",
                                 error.details)
    return error


# -- jobs -----------------------------------------------------------------------------


class Job(msgspec.Struct, frozen=True):
    """One validated generation request: the runtime's params and the reply's shape.

    Attributes:
        params: what the runtime runs, with the request id and the client set (of a
            batch of prompts, the first prompt's).
        shape: makes the reply's bodies or chunks.
        stream: whether the reply is SSE.
        include_usage: SSE only: a last chunk with the usage.
        batch: every prompt's params, in order, when a completion has more than one.
        echo: a completion's prompt text comes before its text.
    """

    params: GenerateParams
    shape: Shape
    stream: bool
    include_usage: bool
    batch: list[GenerateParams] = []
    echo: bool = False

    @property
    def prompts(self) -> list[GenerateParams]:
        """The params of each prompt: the batch's, or the one request's."""
        return self.batch or [self.params]


def chat_job(body: Any, request_id: str, client: str) -> Job:
    """A POST /v1/chat/completions body (builtins) as a job.

    Raises:
        EngineClientError: InvalidParams naming the field (`top_logprobs` without
            `logprobs` included, as OpenAI refuses it).
    """
    request = convert_params(without_nulls(body), ChatCompletionRequest)
    options = request.stream_options
    return Job(request.to_generate_params(request_id=request_id, client=client),
               ChatShape(f"chatcmpl-{request_id}", int(time.time())), request.stream,
               bool(options and options.include_usage))


def completion_job(body: Any, request_id: str, client: str) -> Job:
    """A POST /v1/completions body (builtins) as a job.

    Raises:
        EngineClientError: InvalidParams naming the field (a batch too large, `echo`
            with `logprobs`, and `suffix` included).
    """
    request = convert_params(without_nulls(body), CompletionRequest)
    options = request.stream_options
    batch = request.to_generate_batch(request_id=request_id, client=client)
    return Job(batch[0], CompletionShape(f"cmpl-{request_id}", int(time.time())),
               request.stream, bool(options and options.include_usage),
               batch if len(batch) > 1 else [], request.echo)


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
        if (not chunk.text and chunk.logprobs is None and not chunk.tool_calls
                and not chunk.reasoning):
            return None
        calls = None
        if chunk.tool_calls:
            sent = self._calls[chunk.choice]
            calls = [ToolCallDelta(sent + i, call.id, call.function)
                     for i, call in enumerate(chunk.tool_calls)]
            self._calls[chunk.choice] += len(calls)
        return self._chunk(model, [ChatChunkChoice(
            ChatDelta(content=chunk.text or (None if calls or chunk.reasoning else ""),
                      tool_calls=calls, reasoning_content=chunk.reasoning or None),
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
                                             tool_calls=c.tool_calls or None,
                                             reasoning_content=c.reasoning),
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
