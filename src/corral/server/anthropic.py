"""The Anthropic Messages API's side of the HTTP transport: jobs (a request body as one
typed `GenerateParams`), the reply's shape (a whole message, or its SSE events), and
corral's errors in Anthropic's error body.

Statuses and headers are every API's (`errors.py`): one table, so a client error is
never a 5xx here either; only the body's shape and its `type` differ. Pure functions
and small objects over `protocol/anthropic.py`'s Structs: this module never does I/O
and never calls the runtime.
"""

from __future__ import annotations

import json
from typing import Any, Final, final

import msgspec

from corral.protocol.anthropic import (
    ContentBlock,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    ErrorObject,
    ErrorResponse,
    InputJsonDelta,
    MessageDelta,
    MessageDeltaBody,
    MessageResponse,
    MessagesRequest,
    MessageStart,
    MessageStop,
    MessagesUsage,
    StopReason,
    StreamEvent,
    StreamPing,
    TextBlock,
    TextDelta,
    ToolUseBlock,
)
from corral.protocol.codec import convert_params
from corral.protocol.errors import CorralError
from corral.protocol.messages import FinishReason, GenerateParams, ToolCall, Usage
from corral.runtime.stream_buffers import StreamChunk
from corral.runtime.tools import arguments_object
from corral.server.errors import ErrorShape, status_of
from corral.server.openai import finish_reason

__all__ = ["ANTHROPIC_ERRORS", "MessagesJob", "MessagesShape", "error_body", "event_name",
           "messages_job", "stop_sequence_in"]

_ERROR_TYPES: Final[dict[int, str]] = {
    401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    529: "overloaded_error",
}
_STOP_REASONS: Final[dict[str, StopReason]] = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def error_body(error: CorralError, request_id: str) -> ErrorResponse:
    """Anthropic's error body: `{"type": "error", "error": {"type", "message", ...}}`,
    its `type` from the status."""
    status = status_of(error)
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(ErrorObject(kind, error.message, error.code.value, error.retryable),
                         request_id)


ANTHROPIC_ERRORS: Final = ErrorShape(error_body, "error")
"""corral's errors as the Anthropic API tells them, also as a stream's `error` event."""


class MessagesJob(msgspec.Struct, frozen=True):
    """One validated POST /v1/messages request.

    Attributes:
        params: what the runtime runs, with the request id and the client set.
        stream: whether the reply is SSE.
        message_id: the reply's `id`.
        stop_sequences: the request's, to name the one that ended the reply.
    """

    params: GenerateParams
    stream: bool
    message_id: str
    stop_sequences: list[str]


def messages_job(body: Any, request_id: str, client: str) -> MessagesJob:
    """A POST /v1/messages body (builtins) as a job.

    Raises:
        EngineClientError: InvalidParams naming the field.
    """
    request = convert_params(body, MessagesRequest)
    return MessagesJob(request.to_generate_params(request_id=request_id, client=client),
                       request.stream, f"msg_{request_id}", list(request.stop_sequences or ()))


def stop_sequence_in(generated: str, stops: list[str]) -> str | None:
    """The stop sequence that ended a reply whose tokens decode to `generated`: the one
    found first (the engine stops at the first, so no other can come before it), or
    None when the model ended the reply itself."""
    found = [(at, i) for i, stop in enumerate(stops) if (at := generated.find(stop)) >= 0]
    return stops[min(found)[1]] if found else None


def stop_reason(reason: FinishReason | None, stop_sequence: str | None) -> StopReason:
    """Anthropic's stop reason of a reply that ended without an error.

    Raises:
        EngineClientError: Cancelled, when the runtime ended it (an unloaded model).
    """
    if stop_sequence is not None:
        return "stop_sequence"
    return _STOP_REASONS[finish_reason(reason)]


def usage_of(usage: Usage) -> MessagesUsage:
    return MessagesUsage(usage.prompt_tokens - usage.cached_tokens, usage.completion_tokens,
                         cache_read_input_tokens=usage.cached_tokens)


def _tool_use(call: ToolCall) -> ToolUseBlock:
    """A call as a block (`arguments_object` says what its input is)."""
    return ToolUseBlock(call.id, call.function.name, arguments_object(call))


def event_name(event: StreamEvent | ErrorResponse) -> str:
    """The SSE event name of an event: its `type`."""
    return str(type(event).__struct_config__.tag)


@final
class MessagesShape:
    """The reply of one request: a whole message, or its stream of events, in which
    text goes into a text block and each tool call into a tool_use block of its own
    (its arguments in one `input_json_delta`)."""

    def __init__(self, message_id: str) -> None:
        self._id = message_id
        self._blocks = 0  # blocks started
        self._text_open = False  # the last block started is text, still open

    def opening(self, model: str, usage: Usage) -> list[StreamEvent]:
        """`message_start` (with the prompt's usage) and a `ping`."""
        return [MessageStart(MessageResponse(self._id, model, [], None, None,
                                             usage_of(Usage(usage.prompt_tokens, 0,
                                                            usage.cached_tokens)))),
                StreamPing()]

    def chunk(self, chunk: StreamChunk) -> list[StreamEvent]:
        """The events of one chunk: its text, then its tool calls, each a block."""
        events: list[StreamEvent] = []
        if chunk.text:
            if not self._text_open:
                events.append(self._start(TextBlock("")))
                self._text_open = True
            events.append(ContentBlockDelta(self._blocks - 1, TextDelta(chunk.text)))
        for call in chunk.tool_calls or ():
            events.extend(self._close())
            block = _tool_use(call)
            events.append(self._start(ToolUseBlock(block.id, block.name, {})))
            events.append(ContentBlockDelta(self._blocks - 1, InputJsonDelta(
                json.dumps(block.input, ensure_ascii=False))))
            events.append(ContentBlockStop(self._blocks - 1))
        return events

    def ending(self, reason: StopReason, stop_sequence: str | None,
               usage: Usage) -> list[StreamEvent]:
        """The open block's stop, `message_delta` and `message_stop`."""
        return [*self._close(), MessageDelta(MessageDeltaBody(reason, stop_sequence),
                                             usage_of(usage)), MessageStop()]

    def whole(self, model: str, text: str, calls: list[ToolCall], reason: StopReason,
              stop_sequence: str | None, usage: Usage) -> MessageResponse:
        """The body of a reply that is not streamed."""
        content: list[ContentBlock] = [TextBlock(text)] if text else []
        content.extend(_tool_use(call) for call in calls)
        return MessageResponse(self._id, model, content, reason, stop_sequence,
                               usage_of(usage))

    def _start(self, block: ContentBlock) -> ContentBlockStart:
        self._blocks += 1
        return ContentBlockStart(self._blocks - 1, block)

    def _close(self) -> list[StreamEvent]:
        if not self._text_open:
            return []
        self._text_open = False
        return [ContentBlockStop(self._blocks - 1)]

