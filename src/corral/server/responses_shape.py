"""The Responses API's side of one request's reply: the response object, and the typed
SSE events of a streamed one, made as the runtime's stream goes.

Text becomes an output message (one `output_text` part) that stays open while text
comes; a tool call closes it and becomes a `function_call` item, sent whole (one
arguments delta); text after a call opens a new message. A reply cut at
`max_output_tokens` is `incomplete`. No I/O, no ASGI, no runtime calls: the endpoint
(`responses.py`) feeds this what its stream gives.
"""

from __future__ import annotations

import uuid
from typing import final

import msgspec

from corral.protocol.errors import CorralError
from corral.protocol.messages import Completion, GenerateParams, ToolCall, Usage
from corral.protocol.responses import (
    InputItem,
    ItemStatus,
    OutputText,
    ResponsesRequest,
    TextConfig,
)
from corral.protocol.responses_output import (
    ContentPartEvent,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    LifecycleType,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputTextDelta,
    OutputTextDone,
    OutputTokensDetails,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    ResponsesEvent,
    ResponseStatus,
    ResponseUsage,
)
from corral.runtime.stream_buffers import StreamChunk
from corral.server.openai import finish_reason

__all__ = ["ResponseShape", "as_input_items", "usage_of"]


def usage_of(usage: Usage) -> ResponseUsage:
    """The runtime's counts in the Responses API's shape."""
    return ResponseUsage(usage.prompt_tokens, InputTokensDetails(usage.cached_tokens),
                         usage.completion_tokens, OutputTokensDetails(), usage.total_tokens)


def as_input_items(output: list[OutputItem]) -> list[InputItem]:
    """Output items as a later request's input items (what the store keeps)."""
    items = []
    for item in output:
        if isinstance(item, OutputMessage):
            items.append(InputItem(type="message", role="assistant", content=list(item.content),
                                   id=item.id, status=item.status))
        else:
            items.append(InputItem(type="function_call", call_id=item.call_id, name=item.name,
                                   arguments=item.arguments, id=item.id, status=item.status))
    return items


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@final
class ResponseShape:
    """The response object and events of one request.

    Args:
        request: as the client sent it (its settings are echoed).
        params: what the runtime runs (sampling as in force).
        response_id: the response's `resp_...` id.
        created_at: Unix seconds.
    """

    def __init__(self, request: ResponsesRequest, params: GenerateParams, response_id: str,
                 created_at: int) -> None:
        self.id = response_id
        self._request = request
        self._params = params
        self._created_at = created_at
        self.model = params.model or ""
        self.output: list[OutputItem] = []
        self._sequence = 0
        self._open: tuple[str, int, list[str]] | None = None  # item id, index, text so far

    def response(self, status: ResponseStatus, usage: Usage | None = None,
                 error: CorralError | None = None) -> ResponseObject:
        """The response as it stands, with `status`."""
        request = self._request
        return ResponseObject(
            id=self.id, created_at=self._created_at, model=self.model, status=status,
            output=list(self.output), usage=None if usage is None else usage_of(usage),
            error=None if error is None else ResponseError(error.code.value, error.message),
            incomplete_details=(IncompleteDetails("max_output_tokens")
                                if status == "incomplete" else None),
            instructions=request.instructions, max_output_tokens=request.max_output_tokens,
            temperature=self._params.temperature, top_p=self._params.top_p,
            tools=list(request.tools or []), tool_choice=request.tool_choice or "auto",
            parallel_tool_calls=self._params.parallel_tool_calls,
            previous_response_id=request.previous_response_id,
            text=request.text or TextConfig(), store=request.store,
            metadata=dict(request.metadata or {}), user=request.user)

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def _lifecycle(self, kind: LifecycleType, response: ResponseObject) -> ResponseEvent:
        return ResponseEvent(type=kind, response=response, sequence_number=self._next())

    # -- streamed ---------------------------------------------------------------------

    def opening(self, model: str) -> list[ResponsesEvent]:
        """The events before any output: created, then in progress."""
        self.model = model
        return [self._lifecycle("response.created", self.response("in_progress")),
                self._lifecycle("response.in_progress", self.response("in_progress"))]

    def chunk(self, chunk: StreamChunk) -> list[ResponsesEvent]:
        """The events of one chunk of text and the tool calls it completed."""
        events = self._text(chunk.text) if chunk.text else []
        for call in chunk.tool_calls:
            events += self._close_message("completed")
            events += self._call(call)
        return events

    def ending(self, chunk: StreamChunk,
               usage: Usage) -> tuple[list[ResponsesEvent], ResponseObject]:
        """The events of the end (the open message done, then completed, or incomplete
        when cut at max_output_tokens) and the response they end with.

        Raises:
            EngineClientError: Cancelled, when the runtime ended the stream early.
        """
        if finish_reason(chunk.finish_reason) == "length":
            status: ItemStatus = "incomplete"
            kind: LifecycleType = "response.incomplete"
        else:
            status, kind = "completed", "response.completed"
        events = [] if self.output else self._text("")  # a reply with no text says so
        events += self._close_message(status)
        response = self.response(status, usage)
        events.append(self._lifecycle(kind, response))
        return events, response

    def failed(self, error: CorralError) -> ResponseEvent:
        """The last event of a stream that failed."""
        self._settle_message("incomplete")
        return self._lifecycle("response.failed", self.response("failed", error=error))

    def _text(self, text: str) -> list[ResponsesEvent]:
        events: list[ResponsesEvent] = []
        if self._open is None:
            item_id, index = _item_id("msg"), len(self.output)
            self.output.append(OutputMessage(id=item_id, status="in_progress", content=[]))
            self._open = (item_id, index, [])
            events += [
                OutputItemEvent(type="response.output_item.added", output_index=index,
                                item=self.output[index], sequence_number=self._next()),
                ContentPartEvent(type="response.content_part.added", item_id=item_id,
                                 output_index=index, content_index=0, part=OutputText(text=""),
                                 sequence_number=self._next())]
        item_id, index, parts = self._open
        if text:
            parts.append(text)
            events.append(OutputTextDelta(item_id=item_id, output_index=index, content_index=0,
                                          delta=text, sequence_number=self._next()))
        return events

    def _settle_message(self, status: ItemStatus) -> tuple[int, OutputMessage] | None:
        """The open message, whole, with `status`, and its index (None when none is
        open)."""
        if self._open is None:
            return None
        item_id, index, parts = self._open
        self._open = None
        item = OutputMessage(id=item_id, status=status,
                             content=[OutputText(text="".join(parts))])
        self.output[index] = item
        return index, item

    def _close_message(self, status: ItemStatus) -> list[ResponsesEvent]:
        settled = self._settle_message(status)
        if settled is None:
            return []
        index, item = settled
        item_id, part = item.id, item.content[0]
        return [OutputTextDone(item_id=item_id, output_index=index, content_index=0,
                               text=part.text, sequence_number=self._next()),
                ContentPartEvent(type="response.content_part.done", item_id=item_id,
                                 output_index=index, content_index=0, part=part,
                                 sequence_number=self._next()),
                OutputItemEvent(type="response.output_item.done", output_index=index,
                                item=item, sequence_number=self._next())]

    def _call(self, call: ToolCall) -> list[ResponsesEvent]:
        index = len(self.output)
        item = FunctionCallItem(id=_item_id("fc"), call_id=call.id, name=call.function.name,
                                arguments=call.function.arguments, status="completed")
        self.output.append(item)
        arguments = item.arguments
        return [
            OutputItemEvent(type="response.output_item.added", output_index=index,
                            item=msgspec.structs.replace(item, arguments="",
                                                         status="in_progress"),
                            sequence_number=self._next()),
            FunctionCallArgumentsDelta(item_id=item.id, output_index=index, delta=arguments,
                                       sequence_number=self._next()),
            FunctionCallArgumentsDone(item_id=item.id, output_index=index, name=item.name,
                                      arguments=arguments, sequence_number=self._next()),
            OutputItemEvent(type="response.output_item.done", output_index=index, item=item,
                            sequence_number=self._next())]

    # -- whole ------------------------------------------------------------------------

    def whole(self, completion: Completion) -> ResponseObject:
        """The response of a reply that is not streamed.

        Raises:
            EngineClientError: Cancelled, when the runtime ended it early.
        """
        self.model = completion.model
        status: ItemStatus = ("incomplete" if finish_reason(completion.finish_reason)
                              == "length" else "completed")
        if completion.text or not completion.tool_calls:
            self.output.append(OutputMessage(id=_item_id("msg"), status=status,
                                             content=[OutputText(text=completion.text)]))
        self.output += [FunctionCallItem(id=_item_id("fc"), call_id=call.id,
                                         name=call.function.name,
                                         arguments=call.function.arguments, status="completed")
                        for call in completion.tool_calls]
        return self.response(status, completion.usage)
