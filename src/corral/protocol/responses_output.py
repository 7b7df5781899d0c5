"""What the Responses API answers: the response object, its output items and usage,
and the typed SSE events of a streamed response, in the wire shapes of OpenAI's
`openai.types.responses` (which the official client parses them into).

Every event carries its `type` (also sent as the SSE `event:` name) and a
`sequence_number` counting from 0 within the stream; a failure is the response's
`response.failed` event. Data only: `server/responses_shape.py`
makes these from a stream.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from corral.protocol.responses import (
    FunctionTool,
    ItemStatus,
    OutputText,
    TextConfig,
    ToolChoiceSpec,
)

__all__ = ["ContentPartEvent", "FunctionCallArgumentsDelta", "FunctionCallArgumentsDone",
           "FunctionCallItem", "IncompleteDetails", "InputTokensDetails", "LifecycleType",
           "OutputItem", "OutputItemEvent", "OutputMessage", "OutputTextDelta", "OutputTextDone",
           "OutputTokensDetails", "ResponseDeleted", "ResponseError", "ResponseEvent",
           "ResponseObject", "ResponseStatus", "ResponseUsage", "ResponsesEvent"]

ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]
LifecycleType = Literal["response.created", "response.in_progress", "response.completed",
                        "response.incomplete", "response.failed"]


class OutputMessage(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                    tag="message"):
    """The model's text, as one output item with one `output_text` part."""

    id: str
    status: ItemStatus
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCallItem(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                       tag="function_call"):
    """A call the model made: `call_id` is what its `function_call_output` names."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(msgspec.Struct, frozen=True):
    """`cached_tokens`: input tokens served from the prefix cache."""

    cached_tokens: int


class OutputTokensDetails(msgspec.Struct, frozen=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, frozen=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(msgspec.Struct, frozen=True):
    """Why a response failed: `code` is corral's code name from the error table."""

    code: str
    message: str


class IncompleteDetails(msgspec.Struct, frozen=True):
    reason: Literal["max_output_tokens"]


class ResponseObject(msgspec.Struct, frozen=True, kw_only=True):
    """A response: the reply of a request that is not streamed, the `response` of the
    lifecycle events of one that is, and what GET /v1/responses/{id} returns.

    The request's settings are echoed as in force: `temperature` and `top_p` as
    sampled (corral's defaults when left out), `tools`, `tool_choice` and `text` as
    sent. `output_text` is the client's to add up, as OpenAI's SDKs do.
    """

    id: str
    created_at: int
    model: str
    status: ResponseStatus
    output: list[OutputItem]
    usage: ResponseUsage | None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    tools: list[FunctionTool]
    tool_choice: ToolChoiceSpec
    parallel_tool_calls: bool
    previous_response_id: str | None
    text: TextConfig
    store: bool
    metadata: dict[str, str]
    user: str | None
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    object: Literal["response"] = "response"


class ResponseDeleted(msgspec.Struct, frozen=True):
    """The answer of DELETE /v1/responses/{id}."""

    id: str
    deleted: bool = True
    object: Literal["response"] = "response"


# -- SSE events -----------------------------------------------------------------------


class ResponseEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A lifecycle event: the response as it stands (created, in progress) or ended
    (completed, incomplete, failed)."""

    type: LifecycleType
    response: ResponseObject
    sequence_number: int


class OutputItemEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An output item begins (in progress) or is done."""

    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem
    sequence_number: int


class ContentPartEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A message's text part begins (empty) or is done (whole)."""

    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int


class OutputTextDelta(msgspec.Struct, frozen=True, kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    sequence_number: int
    logprobs: list[Any] = []
    type: Literal["response.output_text.delta"] = "response.output_text.delta"


class OutputTextDone(msgspec.Struct, frozen=True, kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    text: str
    sequence_number: int
    logprobs: list[Any] = []
    type: Literal["response.output_text.done"] = "response.output_text.done"


class FunctionCallArgumentsDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A call's arguments: corral sends each call whole, in one delta."""

    item_id: str
    output_index: int
    delta: str
    sequence_number: int
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta")


class FunctionCallArgumentsDone(msgspec.Struct, frozen=True, kw_only=True):
    item_id: str
    output_index: int
    name: str
    arguments: str
    sequence_number: int
    type: Literal["response.function_call_arguments.done"] = (
        "response.function_call_arguments.done")


ResponsesEvent = (ResponseEvent | OutputItemEvent | ContentPartEvent | OutputTextDelta
                  | OutputTextDone | FunctionCallArgumentsDelta | FunctionCallArgumentsDone)
"""Every event a streamed response sends."""
