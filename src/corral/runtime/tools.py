"""Function calling: what a chat prompt shows the model of its tools, and the model's
tool calls read back out of its text.

The model's chat template renders the tools (mlx_lm's `apply_chat_template(tools=)`),
and the tool-call parser that mlx_lm's loader inferred from that template
(`mlx_lm.tool_parsers.<name>`, named in `ModelInfo.tool_parser`) reads each call.
`ToolCallReader` finds the calls in the text as it streams, with mlx_lm's
`TextStateMachine` (the same one `mlx_lm.server` uses), so the client gets the text
around the calls as content and each call once it is complete.

Pure Python, no MLX: it runs in the runtime's process under either isolation.
"""

from __future__ import annotations

import importlib
import json
import uuid
from typing import Any, final

import msgspec
from mlx_lm.generate import TextStateMachine

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import (
    ChatMessage,
    FunctionCall,
    GenerateParams,
    ModelInfo,
    NamedToolChoice,
    ToolCall,
)

__all__ = ["ToolCallReader", "template_turns", "tools_for"]


def template_turns(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat turns as chat templates take them: a call's arguments as a mapping, as
    Hugging Face's templates expect (OpenAI sends them as JSON text).

    Raises:
        EngineClientError: InvalidParams naming the arguments that are not a JSON object.
    """
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        turn: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            turn["tool_calls"] = [
                {"id": call.id, "type": call.type,
                 "function": {"name": call.function.name,
                              "arguments": _arguments(call.function.arguments,
                                                      f"messages[{index}].tool_calls[{j}]")}}
                for j, call in enumerate(message.tool_calls)]
        if message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            turn["name"] = message.name
        turns.append(turn)
    return turns


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(text)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise EngineClientError(Code.INVALID_PARAMS,
                                f"{where}.function.arguments: expected a JSON object as text",
                                {"field": f"{where}.function.arguments"})
    return arguments


def tools_for(request: GenerateParams, model: str,
              info: ModelInfo | None) -> list[dict[str, Any]] | None:
    """The tools the prompt shows the model: none without `tools` or with
    `tool_choice: "none"`; a named function must be one of them.

    Raises:
        EngineClientError: InvalidParams when tools come without chat messages, when
            the model's chat template has no tool support, or for a named function
            that is not in `tools`.
    """
    if not request.tools or request.tool_choice == "none":
        if isinstance(request.tool_choice, NamedToolChoice) or request.tool_choice == "required":
            raise EngineClientError(Code.INVALID_PARAMS,
                                    "tool_choice: a function must be chosen from tools, "
                                    "and none are given", {"field": "tool_choice"})
        return None
    if request.messages is None:
        raise EngineClientError(Code.INVALID_PARAMS, "tools: only chat messages take tools",
                                {"field": "tools"})
    if info is None or info.tool_parser is None:
        raise EngineClientError(
            Code.INVALID_PARAMS,
            f"tools: model {model!r} does not support tool calling (its chat template "
            f"renders no tools that mlx_lm has a tool-call parser for)", {"field": "tools"})
    names = [tool.function.name for tool in request.tools]
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise EngineClientError(
            Code.INVALID_PARAMS,
            f"tool_choice: function {choice.function.name!r} is not in tools {names}",
            {"field": "tool_choice"})
    return [msgspec.to_builtins(tool) for tool in request.tools]


@final
class ToolCallReader:
    """Splits one stream's text into content and tool calls, as it arrives.

    Text that might begin a call marker is held back until it is known not to; the
    text of an unfinished call waits for its end marker. A call the parser cannot read,
    and a call the stream ended inside of, go back into the content with their markers,
    so no text is ever lost. With `first_only` (OpenAI's `parallel_tool_calls: false`)
    only the first call is kept; later ones are dropped.
    """

    def __init__(self, parser: str, tools: list[dict[str, Any]], *,
                 first_only: bool = False) -> None:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
        self._parse = module.parse_tool_call
        self._start: str = module.tool_call_start
        self._end: str = module.tool_call_end
        self._tools = tools
        self._first_only = first_only
        machine = TextStateMachine({"normal": [(self._start, "tool")],
                                    "tool": [(self._end, "normal")]})
        self._state = machine.make_state("normal")
        self._call_text = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content that `text` completes, and the calls it completes."""
        self._state, segments = TextStateMachine.split(self._state, text)
        content: list[str] = []
        calls: list[ToolCall] = []
        for index, (state, piece) in enumerate(segments):
            if state == "tool":
                self._call_text += piece
                if index < len(segments) - 1:  # the end marker followed
                    content.append(self._read_call(calls))
            else:
                content.append(piece)
        return "".join(content), calls

    def finish(self) -> str:
        """The content still held back when the stream ends: a partial marker, or an
        unfinished call with its start marker."""
        state, _, _, pending = self._state
        if state == "tool":
            return f"{self._start}{self._call_text}{pending}"
        return str(pending)

    def _read_call(self, calls: list[ToolCall]) -> str:
        """Parse the call just ended into `calls`; what goes back into the content."""
        text, self._call_text = self._call_text, ""
        try:
            parsed = self._parse(text, self._tools)
            found = parsed if isinstance(parsed, list) else [parsed]
            made = [ToolCall(id=str(item.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
                             function=FunctionCall(
                                 name=str(item["name"]),
                                 arguments=(item["arguments"]
                                            if isinstance(item["arguments"], str)
                                            else json.dumps(item["arguments"],
                                                            ensure_ascii=False))))
                    for item in found]
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{self._start}{text}{self._end}"
        for call in made:
            if not (self._first_only and self.calls):
                self.calls.append(call)
                calls.append(call)
        return ""
