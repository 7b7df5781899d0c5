"""Anthropic Messages API bodies: requests, responses, SSE events and error bodies.

Requests decode into these Structs, and decoding is the validation: an unknown field
is InvalidParams naming it, and the sampling fields carry the ranges `GenerateParams`
declares, so a request converts itself (`to_generate_params`) into the one typed
`GenerateParams` with nothing left to check. `system`, text blocks, `tools` (their
`input_schema` is the function's parameters), `tool_use` and `tool_result` blocks map
onto the chat turns and tools the OpenAI path gives the chat template; `tool_choice`
any/tool/none onto required/named/none. Image and document blocks decode, to be refused
with a clear message (the models read text only). `cache_control` is accepted and
ignored: corral's prefix cache reuses any shared prefix by itself. An omitted
`temperature` is greedy, as everywhere in corral (Anthropic's default is 1).

This module holds data and its conversion only; `server/anthropic.py` shapes replies.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import (
    MAX_STOP_STRINGS,
    ChatMessage,
    FunctionCall,
    FunctionName,
    GenerateParams,
    Name,
    NamedToolChoice,
    Probability,
    StopString,
    Temperature,
    TokenCount,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceFunction,
    ToolFunction,
    TopK,
)

__all__ = ["CountTokensRequest", "MessagesRequest"]

_Ignored = dict[str, Any] | None
"""A field accepted and not used (`cache_control`)."""


# -- request content blocks -------------------------------------------------------------


class TextBlockIn(msgspec.Struct, frozen=True, tag="text", tag_field="type",
                  forbid_unknown_fields=True):
    text: str
    cache_control: _Ignored = None


class ImageBlockIn(msgspec.Struct, frozen=True, tag="image", tag_field="type"):
    """Decoded only to be refused by name (see `chat_messages`)."""


class DocumentBlockIn(msgspec.Struct, frozen=True, tag="document", tag_field="type"):
    """Decoded only to be refused by name (see `chat_messages`)."""


class ToolUseBlockIn(msgspec.Struct, frozen=True, tag="tool_use", tag_field="type",
                     forbid_unknown_fields=True):
    """A call the assistant made, in an earlier turn."""

    id: str
    name: str
    input: dict[str, Any]
    cache_control: _Ignored = None


class ToolResultBlockIn(msgspec.Struct, frozen=True, tag="tool_result", tag_field="type",
                        forbid_unknown_fields=True):
    """What a call returned; `is_error` marks its text as an error for the model."""

    tool_use_id: str
    content: str | list[TextBlockIn | ImageBlockIn] = ""
    is_error: bool = False
    cache_control: _Ignored = None


ContentBlockIn = TextBlockIn | ImageBlockIn | DocumentBlockIn | ToolUseBlockIn | ToolResultBlockIn


class MessageIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlockIn]


class ToolIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A client tool: a function whose arguments `input_schema` describes."""

    name: FunctionName
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: _Ignored = None


class ToolChoiceAuto(msgspec.Struct, frozen=True, tag="auto", tag_field="type",
                     forbid_unknown_fields=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(msgspec.Struct, frozen=True, tag="any", tag_field="type",
                    forbid_unknown_fields=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(msgspec.Struct, frozen=True, tag="tool", tag_field="type",
                     forbid_unknown_fields=True):
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(msgspec.Struct, frozen=True, tag="none", tag_field="type",
                     forbid_unknown_fields=True):
    pass


ToolChoiceIn = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Metadata(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user_id: str | None = None  # accepted, not used


# -- requests -----------------------------------------------------------------------------


class _Prompt(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What POST /v1/messages and /v1/messages/count_tokens share: the prompt."""

    model: Name
    messages: list[MessageIn]
    system: str | list[TextBlockIn] | None = None
    tools: Annotated[list[ToolIn], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoiceIn | None = None

    def chat_messages(self) -> list[ChatMessage]:
        """The system prompt and the turns as corral's chat turns: an assistant turn's
        `tool_use` blocks become its tool calls, each `tool_result` block a `tool` turn
        (named after the call it answers), the text of a turn one message.

        Raises:
            EngineClientError: InvalidParams naming an image or document block.
        """
        turns: list[ChatMessage] = []
        if self.system:
            turns.append(ChatMessage("system", _text(self.system, "system")))
        names: dict[str, str] = {}  # tool_use id -> the function it called
        for i, message in enumerate(self.messages):
            where = f"messages[{i}].content"
            blocks = ([TextBlockIn(message.content)] if isinstance(message.content, str)
                      else message.content)
            if message.role == "assistant":
                calls = [ToolCall(b.id, FunctionCall(b.name, json.dumps(b.input,
                                                                        ensure_ascii=False)))
                         for b in blocks if isinstance(b, ToolUseBlockIn)]
                names.update((call.id, call.function.name) for call in calls)
                text = _text([b for b in blocks if not isinstance(b, ToolUseBlockIn)], where)
                turns.append(ChatMessage("assistant", text, tool_calls=calls))
                continue
            pending: list[TextBlockIn | ImageBlockIn | DocumentBlockIn | ToolUseBlockIn] = []
            for j, block in enumerate(blocks):
                if not isinstance(block, ToolResultBlockIn):
                    pending.append(block)
                    continue
                if pending:
                    turns.append(ChatMessage("user", _text(pending, where)))
                    pending = []
                result = _text(block.content, f"{where}[{j}].content")
                turns.append(ChatMessage(
                    "tool", f"Error: {result}" if block.is_error else result,
                    tool_call_id=block.tool_use_id, name=names.get(block.tool_use_id)))
            if pending or not blocks:
                turns.append(ChatMessage("user", _text(pending, where)))
        return turns

    def _tools(self) -> tuple[list[Tool] | None, ToolChoice | None, bool]:
        """`tools`, `tool_choice` and `parallel_tool_calls` as `GenerateParams` has them."""
        tools = None if self.tools is None else [
            Tool(ToolFunction(t.name, t.description, t.input_schema)) for t in self.tools]
        match self.tool_choice:
            case None:
                return tools, None, True
            case ToolChoiceNone():
                return tools, "none", True
            case ToolChoiceAuto(disable_parallel_tool_use=single):
                return tools, "auto", not single
            case ToolChoiceAny(disable_parallel_tool_use=single):
                return tools, "required", not single
            case ToolChoiceTool(name=name, disable_parallel_tool_use=single):
                return tools, NamedToolChoice(ToolChoiceFunction(name)), not single


class MessagesRequest(_Prompt, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/messages. `max_tokens` is required, as Anthropic's is; `stop_sequences`
    end the reply with `stop_reason` "stop_sequence"."""

    max_tokens: TokenCount
    stop_sequences: Annotated[list[StopString],
                              msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    temperature: Temperature = 0.0
    top_p: Probability = 1.0
    top_k: TopK = 0
    metadata: Metadata | None = None
    cache_control: _Ignored = None

    def to_generate_params(self, *, request_id: str, client: str) -> GenerateParams:
        """This request as the runtime runs it.

        Raises:
            EngineClientError: InvalidParams naming an image or document block.
        """
        tools, choice, parallel = self._tools()
        return GenerateParams(
            model=self.model, messages=self.chat_messages(), max_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stop=list(self.stop_sequences) if self.stop_sequences else None, tools=tools,
            tool_choice=choice, parallel_tool_calls=parallel, request_id=request_id,
            client=client, separate_reasoning=False)  # no thinking blocks yet


class CountTokensRequest(_Prompt, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/messages/count_tokens: the prompt a request with these fields would have."""

    def to_generate_params(self, *, request_id: str, client: str) -> GenerateParams:
        """The prompt as the runtime renders it (see `MessagesRequest`).

        Raises:
            EngineClientError: InvalidParams naming an image or document block.
        """
        tools, choice, parallel = self._tools()
        return GenerateParams(model=self.model, messages=self.chat_messages(), tools=tools,
                              tool_choice=choice, parallel_tool_calls=parallel,
                              request_id=request_id, client=client)


def _text(content: str | list[Any], where: str) -> str:
    """The text of `content` (a string or text blocks), joined.

    Raises:
        EngineClientError: InvalidParams naming the first block that is not text.
    """
    if isinstance(content, str):
        return content
    for j, block in enumerate(content):
        if not isinstance(block, TextBlockIn):
            kind = type(block).__struct_config__.tag
            raise EngineClientError(
                Code.INVALID_PARAMS, f"{where}[{j}]: {kind} blocks are not supported; "
                "corral's models read text only", {"field": f"{where}[{j}]"})
    return "".join(block.text for block in content)


# -- responses --------------------------------------------------------------------------


class TextBlock(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    text: str


class ToolUseBlock(msgspec.Struct, frozen=True, tag="tool_use", tag_field="type"):
    """A call the model made: `input` is its arguments."""

    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextBlock | ToolUseBlock

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessagesUsage(msgspec.Struct, frozen=True):
    """Anthropic's `usage`: `input_tokens` are the prompt tokens prefilled, and
    `cache_read_input_tokens` those taken from the prefix cache (their sum is the
    prompt)."""

    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class MessageResponse(msgspec.Struct, frozen=True, tag="message", tag_field="type"):
    """A whole reply; in `message_start`, the reply so far (no content yet)."""

    id: str
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessagesUsage
    role: Literal["assistant"] = "assistant"


class CountTokensResponse(msgspec.Struct, frozen=True):
    input_tokens: int


# -- SSE events: each is sent as `event: <its tag>` -----------------------------------------


class MessageStart(msgspec.Struct, frozen=True, tag="message_start", tag_field="type"):
    message: MessageResponse


class StreamPing(msgspec.Struct, frozen=True, tag="ping", tag_field="type"):
    pass


class ContentBlockStart(msgspec.Struct, frozen=True, tag="content_block_start",
                        tag_field="type"):
    index: int
    content_block: ContentBlock


class TextDelta(msgspec.Struct, frozen=True, tag="text_delta", tag_field="type"):
    text: str


class InputJsonDelta(msgspec.Struct, frozen=True, tag="input_json_delta", tag_field="type"):
    partial_json: str


class ContentBlockDelta(msgspec.Struct, frozen=True, tag="content_block_delta",
                        tag_field="type"):
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(msgspec.Struct, frozen=True, tag="content_block_stop",
                       tag_field="type"):
    index: int


class MessageDeltaBody(msgspec.Struct, frozen=True):
    stop_reason: StopReason
    stop_sequence: str | None


class MessageDelta(msgspec.Struct, frozen=True, tag="message_delta", tag_field="type"):
    """How the reply ended, with the final usage."""

    delta: MessageDeltaBody
    usage: MessagesUsage


class MessageStop(msgspec.Struct, frozen=True, tag="message_stop", tag_field="type"):
    pass


StreamEvent = (MessageStart | StreamPing | ContentBlockStart | ContentBlockDelta
               | ContentBlockStop | MessageDelta | MessageStop)


# -- errors -------------------------------------------------------------------------------


class ErrorObject(msgspec.Struct, frozen=True):
    """Anthropic's error object; `code` (corral's code name) and `retryable` are
    corral's additions."""

    type: str
    message: str
    code: str
    retryable: bool


class ErrorResponse(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    """Every error body of the Anthropic API, and the `error` event of a stream."""

    error: ErrorObject
    request_id: str
