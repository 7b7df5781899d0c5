"""Function calling: what a chat prompt shows the model of its tools, and the model's
tool calls read back out of its text.

The model's chat template renders the tools (mlx_lm's `apply_chat_template(tools=)`),
and the tool-call parser that mlx_lm's loader inferred from that template
(`mlx_lm.tool_parsers.<name>`, named in `ModelInfo.tool_parser`) reads each call.
`ToolCallReader` finds the calls in the text as it streams, with mlx_lm's
`TextStateMachine` (the same one `mlx_lm.server` uses), so the client gets the text
around the calls as content and each call once it is complete.

No MLX of its own: it runs in the runtime's process under either isolation, and loads
mlx_lm's parser and state machine only for a request that has tools (importing mlx_lm
imports MLX, which a runtime whose engines run in worker processes otherwise never
loads).
"""

from __future__ import annotations

import importlib
import json
import uuid
from collections.abc import Callable
from typing import Any, Final, final

import msgspec

from corral.engine.grammar import lark_grammar
from corral.engine.mlx_import import import_mlx_lm
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import (
    ChatMessage,
    FunctionCall,
    GenerateParams,
    ModelInfo,
    NamedToolChoice,
    ToolCall,
    ToolCalling,
    ToolFunction,
)
from corral.protocol.schema_bounds import bounded, longest
from corral.protocol.schema_refs import (
    check_ref_cycles,
    has_local_refs,
    nest_refs,
    resolve_pointer,
)

__all__ = ["MAX_CALLS", "ToolCallReader", "arguments_object", "call_bounds", "constrained",
           "template_turns", "tool_choice_grammar", "tools_for"]

_NEWLINE: Final = "\n"


def arguments_object(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as an object, for the APIs that send them as one (Anthropic's
    `input`, Ollama's `arguments`): the parser makes JSON objects, and anything else (a
    model's slip the parser let through) is kept whole, as `{"arguments": <text>}`."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        return {"arguments": call.function.arguments}
    return arguments


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
    if info is None or info.tool_calling is None:
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


def tool_choice_grammar(request: GenerateParams, model: str, calling: ToolCalling,
                        max_tokens: int | None = None) -> str | None:
    """The grammar that makes the model call a tool, for `tool_choice` "required" (one
    of `tools`; more than one call unless `parallel_tool_calls` is false) or a named
    function (that one, once), or None when the model may answer as it likes.

    A call is the parser's start marker, the call in the model's format (`_CALLS`), and
    its end marker, so what is generated always parses and its arguments follow the
    function's `parameters` schema. Schema keywords llguidance does not implement are
    ignored, unless every function is `strict`.

    A function's `parameters` keep their local references (`#/$defs/...`, as Pydantic
    writes them): nested in the call's grammar, they are rewritten to where the
    parameters now sit (`nest_refs`).

    The calls always end: what a function's `parameters` leave open is bounded
    (`corral.protocol.schema_bounds.bounded`), with strings as long as lets one call of
    the longest function fit in `max_tokens`, and as many calls as fit (at most
    `MAX_CALLS`) when several may come (see `call_bounds`).

    Raises:
        EngineClientError: GuidanceError when the model's tool-call format is not one
            a grammar can be written for, or a function's `parameters` hold a `$ref`
            cycle that admits no finite value.
    """
    choice = request.tool_choice
    if not request.tools or not (choice == "required" or isinstance(choice, NamedToolChoice)):
        return None
    write = _CALLS.get(calling.parser)
    if write is None:
        raise EngineClientError(
            Code.GUIDANCE_ERROR,
            f"tool_choice: model {model!r} writes tool calls in the {calling.parser!r} format; "
            f"calls can be enforced for {sorted(_CALLS)} only (use 'auto')",
            {"field": "tool_choice"})
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    chosen = [tool.function for tool in request.tools if named in (None, tool.function.name)]
    for index, tool in enumerate(request.tools):
        if tool.function in chosen and tool.function.parameters:
            check_ref_cycles(tool.function.parameters, "tools",
                             f"tools[{index}].function.parameters")
    options = {"whitespace_flexible": False,
               "lenient": not all(tool.function.strict for tool in request.tools)}
    several = named is None and request.parallel_tool_calls
    max_length, calls = call_bounds(chosen, max_tokens, several=several)
    chosen = [msgspec.structs.replace(function, parameters=bounded(
        function.parameters or {"type": "object"}, max_length)) for function in chosen]
    import_mlx_lm()
    module = importlib.import_module(f"mlx_lm.tool_parsers.{calling.parser}")
    start, end = module.tool_call_start, module.tool_call_end
    if calling.marker_tokens:  # llguidance names an added token as <tool_call>
        block = f'{start} "\\n" call "\\n" {end}'
    else:
        block = f'{json.dumps(start)} "\\n" call "\\n" {json.dumps(end)}'
    repeat = f"{{1,{calls}}}" if calls > 1 else ""
    return lark_grammar(f"start: ({block}){repeat}\n{write(chosen, options)}")


MAX_CALLS: Final = 8
"""The most calls one forced reply holds when several may come."""

# The string lengths tried, longest first, when a forced call must fit in max_tokens.
_STRING_LENGTHS: Final = (256, 128, 64, 32, 16, 8, 4, 2, 1)
# Room around a call's arguments: its markers and newlines, the JSON around them or,
# in the XML format, the lines around each parameter.
_CALL_ROOM: Final = 64
_PARAMETER_ROOM: Final = 32


def call_bounds(functions: list[ToolFunction], max_tokens: int | None, *,
                several: bool) -> tuple[int, int]:
    """The longest string a forced call's arguments may hold, and how many calls may
    come, so that every reply fits in `max_tokens` (a token is at least one byte):
    the longest strings with which one call of any of `functions` fits, then as many
    such calls as fit (at most `MAX_CALLS`, one unless `several`). Without
    `max_tokens`, or for parameters that nothing bounds (properties allowed
    explicitly, a recursive reference), the longest strings and one call: the
    schema's own bounds, if any, are what ends such a call.
    """
    def longest_call(max_length: int) -> int | None:
        sizes = []
        for function in functions:
            parameters = bounded(function.parameters or {"type": "object"}, max_length)
            size = longest(parameters)
            if size is None:
                return None
            properties = parameters.get("properties", {})
            sizes.append(size + len(function.name) + _CALL_ROOM
                         + _PARAMETER_ROOM * len(properties))
        return max(sizes)

    if max_tokens is None:
        return _STRING_LENGTHS[0], MAX_CALLS if several else 1
    for max_length in _STRING_LENGTHS:
        size = longest_call(max_length)
        if size is None:
            return _STRING_LENGTHS[0], 1
        if size <= max_tokens or max_length == _STRING_LENGTHS[-1]:
            calls = min(MAX_CALLS, max(1, max_tokens // size)) if several else 1
            return max_length, calls
    raise AssertionError("unreachable: the last length always returns")


def _json_calls(functions: list[ToolFunction], options: dict[str, Any]) -> str:
    """The `call` rule of the `json_tools` format (Qwen 2.5, Hermes): one JSON object,
    `{"name": ..., "arguments": {...}}`. Parameters with local references move to the
    root's `$defs` (as `tool<i>`), where their rewritten pointers resolve."""
    moved: dict[str, Any] = {}

    def arguments(index: int, parameters: dict[str, Any] | None) -> dict[str, Any]:
        if not parameters or not has_local_refs(parameters):
            return parameters or {"type": "object"}
        at = f"tool{index}"
        moved[at] = nest_refs(parameters, f"#/$defs/{at}")
        return {"$ref": f"#/$defs/{at}"}

    calls = [{"type": "object", "additionalProperties": False,
              "required": ["name", "arguments"],
              "properties": {"name": {"const": function.name},
                             "arguments": arguments(index, function.parameters)}}
             for index, function in enumerate(functions)]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if moved:
        schema = {**schema, "$defs": moved}
    return f"call: %json {json.dumps({**schema, 'x-guidance': options})}\n"


def _xml_calls(functions: list[ToolFunction], options: dict[str, Any]) -> str:
    """The `call` rule of the `qwen3_coder` format (Qwen 3 Coder): `<function=NAME>`, each
    parameter as `<parameter=P>`, its value and `</parameter>` on lines of their own,
    then `</function>`. The required parameters come in the schema's order, each
    optional one after them or not; a value is written as the parser reads its type
    (text for a string, JSON for the rest)."""
    rules = ["call: " + " | ".join(f"f{i}" for i in range(len(functions)))]
    for i, function in enumerate(functions):
        schema = function.parameters or {}
        document = schema if has_local_refs(schema) else None
        required = set(schema.get("required", []))
        parameters: list[str] = []
        for j, (name, value) in enumerate(dict(schema.get("properties", {})).items()):
            rule = f"f{i}p{j}"
            rules.append(f"{rule}: {json.dumps(f'<parameter={name}>{_NEWLINE}')} {rule}v "
                         f"{json.dumps(f'{_NEWLINE}</parameter>{_NEWLINE}')}")
            rules.append(f"{rule}v: {_xml_value(value, options, document)}")
            parameters.append(rule if name in required else f"{rule}?")
        rules.append(f"f{i}: {json.dumps(f'<function={function.name}>{_NEWLINE}')} "
                     f"{' '.join(parameters)} \"</function>\"")
    return "\n".join(rules) + "\n"


def _xml_value(schema: Any, options: dict[str, Any], document: dict[str, Any] | None) -> str:
    """One parameter's value in the `qwen3_coder` format, as a rule body. With the
    parameters' `document` (when they hold local references), a JSON value's schema
    carries a copy of it in its `$defs`, where its rewritten pointers resolve."""
    if not isinstance(schema, dict):
        return "/[^<\\n]+/"
    ref = schema.get("$ref")
    if document is not None and isinstance(ref, str) and len(schema) == 1:
        target = resolve_pointer(document, ref)  # an enum or a string is written as text
        if isinstance(target, dict) and "$ref" not in target:
            return _xml_value(target, options, document)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return " | ".join(json.dumps(v) for v in enum)
    if schema.get("type") == "string":
        most = schema.get("maxLength")
        return f"/[^<\\n]{{1,{most}}}/" if isinstance(most, int) and most > 0 else "/[^<\\n]+/"
    if schema.get("type") == "boolean":
        return '"true" | "false"'
    if document is not None:
        at = "#/$defs/parameters"
        schema = {**nest_refs(schema, at), "$defs": {**schema.get("$defs", {}),
                                                     "parameters": nest_refs(document, at)}}
    return f"%json {json.dumps({**schema, 'x-guidance': options})}"


_CALLS: Final[dict[str, Callable[[list[ToolFunction], dict[str, Any]], str]]] = {
    "json_tools": _json_calls, "qwen3_coder": _xml_calls}
"""Tool-call formats whose calls `tool_choice_grammar` can write as a grammar, by the
`mlx_lm.tool_parsers` module that reads them."""


def constrained(grammar: str | None, request: GenerateParams, model: str,
                info: ModelInfo | None, tools: list[dict[str, Any]] | None,
                max_tokens: int | None) -> tuple[str | None, str]:
    """The grammar of a required or named tool call when the request asks for one
    (its calls fitting in `max_tokens`, see `tool_choice_grammar`), else `grammar` (its
    `response_format`'s), and the request field the grammar comes from (for errors).

    Raises:
        EngineClientError: InvalidParams for a required call with a response_format;
            GuidanceError as `tool_choice_grammar` says.
    """
    if not tools or info is None or info.tool_calling is None:
        return grammar, "response_format"
    calls = tool_choice_grammar(request, model, info.tool_calling, max_tokens)
    if calls is None:
        return grammar, "response_format"
    if grammar is not None:
        raise EngineClientError(Code.INVALID_PARAMS, "tool_choice: a required or named tool "
                                "call cannot be combined with a response_format",
                                {"field": "tool_choice"})
    return calls, "tool_choice"


@final
class ToolCallReader:
    """Splits one stream's text into content and tool calls, as it arrives.

    Text that might begin a call marker is held back until it is known not to; the
    text of an unfinished call waits for its end marker, or for the end of the stream in
    a format whose calls have none (Mistral's). A call the parser cannot read, and a
    call the stream ended inside of, go back into the content with their markers, so
    no text is ever lost. With `first_only` (OpenAI's `parallel_tool_calls: false`)
    only the first call is kept; later ones are dropped.
    """

    def __init__(self, parser: str, tools: list[dict[str, Any]], *,
                 first_only: bool = False) -> None:
        import_mlx_lm()
        from mlx_lm.generate import TextStateMachine

        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
        self._parse = module.parse_tool_call
        self._start: str = module.tool_call_start
        self._end: str = module.tool_call_end
        self._tools = tools
        self._first_only = first_only
        self._machine = TextStateMachine({"normal": [(self._start, "tool")],
                                          "tool": [(self._end, "normal")] if self._end
                                          else []})
        self._state = self._machine.make_state("normal")
        self._call_text = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content that `text` completes, and the calls it completes."""
        self._state, segments = self._machine.split(self._state, text)
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

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What was held back when the stream ends: content (a partial marker, or an
        unfinished call with its start marker), and the calls of a format whose calls
        end with the stream."""
        state, _, _, pending = self._state
        if state != "tool":
            return str(pending), []
        self._call_text += pending
        if self._end:
            return f"{self._start}{self._call_text}", []
        calls: list[ToolCall] = []
        return self._read_call(calls), calls

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
