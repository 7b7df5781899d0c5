"""OpenAI's Responses API requests (POST /v1/responses): the body, its input items, its
tools and text format, and their one conversion to the runtime's `GenerateParams`.

Decoding is the validation, as for chat completions: an unknown field, or an item or
tool of a kind corral does not serve (images, files, built-in tools, reasoning items),
is InvalidParams naming it. Ranges are those `GenerateParams` declares (`Temperature`,
`Probability`, `MAX_TOOLS`, `ToolFunction`'s name, `JsonSchema`'s name), reused here
so that a value is named as the client sent it. `top_k`, `seed` and `timeout_ms` are
accepted as extensions, as chat completions accept them. Data and conversion only: no
I/O, and nothing of HTTP (`server/responses.py` serves it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.grammar import (
    JsonObjectFormat,
    JsonSchema,
    JsonSchemaFormat,
    ResponseFormat,
    TextFormat,
)
from corral.protocol.messages import (
    MAX_TOOLS,
    ChatMessage,
    FunctionCall,
    GenerateParams,
    Name,
    NamedToolChoice,
    Probability,
    Seed,
    Temperature,
    TimeoutMs,
    TokenCount,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceFunction,
    ToolFunction,
    TopK,
)

__all__ = ["ContentPart", "FunctionTool", "FunctionToolChoice", "InputItem", "InputText",
           "ItemStatus", "JsonSchemaText", "OutputText", "ResponsesRequest", "TextConfig",
           "TextFormatSpec", "ToolChoiceSpec", "conversation_turns"]

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class InputText(msgspec.Struct, frozen=True, tag_field="type", tag="input_text",
                forbid_unknown_fields=True):
    """Text the user (or system, or a tool's output) gave."""

    text: str


class OutputText(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                 tag="output_text", forbid_unknown_fields=True):
    """Text the model wrote: a part of an output message, and of an assistant message
    sent back as input. corral makes no annotations; log-probabilities are not reported
    in the Responses API (empty)."""

    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


ContentPart = InputText | OutputText


def _text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


class InputItem(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One item of `input`: a message, a function call the model made, or a call's
    output. One Struct for the three, told apart by `type`, which a message may leave
    out (OpenAI's "easy" message); which fields each needs is checked when the items
    become chat turns (`conversation_turns`). Output items sent back as input (as
    clients do with `response.output`) decode as these too, `id` and `status` included.

    Attributes:
        role: a message's; `developer` is taken as `system`.
        content: a message's text, or its text parts.
        call_id: the call a function call or its output belongs to.
        name, arguments: a function call's function and its arguments (JSON text).
        output: a function call's output.
    """

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None
    id: str | None = None
    status: ItemStatus | None = None


class FunctionTool(ToolFunction, frozen=True, tag_field="type", tag="function",
                   forbid_unknown_fields=True):
    """A function tool in the Responses API's flat shape (`{"type": "function", "name",
    "parameters", ...}`); the only kind of tool corral serves."""

    def tool(self) -> Tool:
        """The tool in chat completions' nested shape, as the runtime takes it."""
        return Tool(ToolFunction(self.name, self.description, self.parameters, self.strict))


class FunctionToolChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`tool_choice` naming the one function the model must call (flat, as `tools`)."""

    type: Literal["function"]
    name: str


ToolChoiceSpec = Literal["none", "auto", "required"] | FunctionToolChoice
"""The Responses API's `tool_choice`: as chat completions', with a flat named function."""


class JsonSchemaText(JsonSchema, frozen=True, kw_only=True, tag_field="type",
                     tag="json_schema", forbid_unknown_fields=True):
    """`text.format` of type json_schema: `JsonSchema`'s fields, flat."""


TextFormatSpec = TextFormat | JsonObjectFormat | JsonSchemaText
"""`text.format`: free text, any JSON object, or JSON that a schema accepts."""


class TextConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`text`: the format of the output text."""

    format: TextFormatSpec = TextFormat()

    def response_format(self) -> ResponseFormat:
        """The format as chat completions' `response_format` (what the runtime takes)."""
        spec = self.format
        if isinstance(spec, JsonSchemaText):
            return JsonSchemaFormat(JsonSchema(name=spec.name, schema=spec.schema,
                                               strict=spec.strict,
                                               description=spec.description))
        return spec


class ResponsesRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/responses.

    `input` is a user message's text, or items (`InputItem`); `instructions` a system
    message put first (for this request only: a continued conversation does not keep
    the previous request's). `previous_response_id` continues a stored conversation;
    `store` false keeps this one out of the store. `text.format` constrains the output
    as `response_format` does. `metadata` and `user` are echoed, not used.
    """

    input: str | list[InputItem]
    model: Name | None = None
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoiceSpec | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: Annotated[dict[str, str], msgspec.Meta(max_length=16)] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    # Extensions, as chat completions accept them.
    top_k: TopK | None = None
    seed: Seed | None = None
    timeout_ms: TimeoutMs | None = None

    def input_items(self) -> list[InputItem]:
        """`input` as items: text is one user message."""
        if isinstance(self.input, str):
            return [InputItem(role="user", content=self.input)]
        return list(self.input)

    def to_generate_params(self, previous: Sequence[InputItem], *, request_id: str,
                           client: str) -> GenerateParams:
        """The runtime's params for this request, continuing the conversation
        `previous` (the items a stored response holds; none for a new one).

        Raises:
            EngineClientError: InvalidParams for an empty conversation, or naming the
                input item that lacks a field its type needs.
        """
        turns = conversation_turns([*previous, *self.input_items()], len(previous))
        if not turns:
            raise EngineClientError(Code.INVALID_PARAMS, "input: expected at least one item",
                                    {"field": "input"})
        system = [] if self.instructions is None else [ChatMessage("system",
                                                                   self.instructions)]
        params = GenerateParams(
            model=self.model, messages=[*system, *turns],
            max_tokens=self.max_output_tokens,
            tools=None if self.tools is None else [tool.tool() for tool in self.tools],
            tool_choice=self._tool_choice(),
            response_format=None if self.text is None else self.text.response_format(),
            seed=self.seed, timeout_ms=self.timeout_ms, request_id=request_id,
            client=client, separate_reasoning=False)  # no reasoning items yet
        # What the client left out keeps GenerateParams' defaults.
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "parallel_tool_calls": self.parallel_tool_calls}
        return msgspec.structs.replace(
            params, **{key: value for key, value in given.items() if value is not None})

    def _tool_choice(self) -> ToolChoice | None:
        choice = self.tool_choice
        if isinstance(choice, FunctionToolChoice):
            return NamedToolChoice(ToolChoiceFunction(choice.name))
        return choice


def _required(value: str | list[ContentPart] | None, where: str, field: str,
              kind: str) -> str:
    if value is None:
        raise EngineClientError(Code.INVALID_PARAMS,
                                f"{where}.{field}: required for a {kind} item",
                                {"field": f"{where}.{field}"})
    return _text(value)


def conversation_turns(items: Sequence[InputItem], stored: int = 0) -> list[ChatMessage]:
    """Input items as chat turns: a function call joins the assistant turn before it
    (its text, and the calls made with it), and a call's output is a `tool` turn
    naming the call's function.

    Args:
        stored: how many of the first items came from a stored response; an error
            names the items after them by their place in the request's `input`.

    Raises:
        EngineClientError: InvalidParams naming the item and the field its type needs.
    """
    turns: list[ChatMessage] = []
    names: dict[str, str] = {}  # call id -> the function called
    for index, item in enumerate(items):
        where = f"input[{index - stored}]" if index >= stored else "previous_response_id"
        if item.type == "message":
            if item.role is None:
                raise EngineClientError(Code.INVALID_PARAMS,
                                        f"{where}.role: required for a message item",
                                        {"field": f"{where}.role"})
            content = _required(item.content, where, "content", "message")
            turns.append(ChatMessage("system" if item.role == "developer" else item.role,
                                     content))
        elif item.type == "function_call":
            call = ToolCall(_required(item.call_id, where, "call_id", "function_call"),
                            FunctionCall(_required(item.name, where, "name", "function_call"),
                                         _required(item.arguments, where, "arguments",
                                                   "function_call")))
            names[call.id] = call.function.name
            if turns and turns[-1].role == "assistant":
                last = turns[-1]
                turns[-1] = msgspec.structs.replace(last, tool_calls=[*last.tool_calls, call])
            else:
                turns.append(ChatMessage("assistant", "", tool_calls=[call]))
        else:
            call_id = _required(item.call_id, where, "call_id", "function_call_output")
            turns.append(ChatMessage(
                "tool", _required(item.output, where, "output", "function_call_output"),
                tool_call_id=call_id, name=names.get(call_id)))
    return turns
