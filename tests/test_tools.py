"""Function calling (issue 14, item 1): tools rendered by the model's chat template,
assistant `tool_calls` and `tool` turns accepted, and the model's calls read back out of
its text with mlx_lm's tool parser, streamed or not.

The reader is checked on its own against every way a text can be cut into chunks; the
rest runs the tiny model (whose template renders tools as Qwen 2.5's does) behind a real
HTTP server on 127.0.0.1, driven by the official `openai` client.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from corral.config import config_from_mapping
from corral.runtime import open_runtime
from corral.runtime.tools import ToolCallReader
from test_http import Served, serve_http, served  # noqa: F401  (`served` is a fixture)
from test_jsonrpc_server import Client
from test_jsonrpc_server import serve as serve_jsonrpc
from test_serve import serve_process

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city.",
                 "parameters": {"type": "object",
                                "properties": {"city": {"type": "string", "maxLength": 12}},
                                "required": ["city"], "additionalProperties": False}}}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
CALLED: list[Any] = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."},
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# -- the reader --------------------------------------------------------------------------


def _read(pieces: list[str], *, first_only: bool = False) -> tuple[str, list[Any]]:
    reader = ToolCallReader("json_tools", [WEATHER], first_only=first_only)
    content = []
    calls = []
    for piece in pieces:
        text, made = reader.feed(piece)
        content.append(text)
        calls.extend(made)
    rest, last = reader.finish()
    content.append(rest)
    calls.extend(last)
    assert calls == reader.calls
    return "".join(content), calls


def _cuts(text: str, points: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(p % (len(text) + 1) for p in points)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_calls_and_content_do_not_depend_on_how_the_text_is_cut(points: list[int]) -> None:
    text = f"Let me check. {CALL} and {CALL.replace('Paris', 'Oslo')} done <tool"
    content, calls = _read(_cuts(text, points))
    assert content == "Let me check.  and  done <tool"
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"},
                                                                 {"city": "Oslo"}]
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_a_call_the_parser_cannot_read_and_an_unfinished_one_stay_in_the_content() -> None:
    broken = "<tool_call>\n{not json}\n</tool_call>"
    content, calls = _read([f"a {broken} b <tool_call>\n{{\"name\": "])
    assert calls == []
    assert content == f'a {broken} b <tool_call>\n{{"name": '


def test_a_format_without_an_end_marker_ends_its_calls_with_the_stream() -> None:
    # Mistral's: [TOOL_CALLS] then the calls, up to the end of the reply.
    reader = ToolCallReader("mistral", [WEATHER])
    text = 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    content = [reader.feed(piece)[0] for piece in (text[:9], text[9:20], text[20:])]
    assert reader.calls == []  # not before the end: the calls run to it
    rest, calls = reader.finish()
    assert "".join(content) + rest == "Sure. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"})]
    unfinished = ToolCallReader("mistral", [WEATHER])
    assert unfinished.feed('[TOOL_CALLS][{"name": "get_')[0] == ""
    assert unfinished.finish() == ('[TOOL_CALLS][{"name": "get_', [])


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    content, calls = _read([CALL, CALL.replace("Paris", "Oslo")], first_only=True)
    assert content == ""
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris"]


# -- over HTTP -----------------------------------------------------------------------------


async def _chat(served: Served, **params: Any) -> Any:
    return await served.sync(lambda client: client.chat.completions.create(
        model="tiny", max_tokens=4, **params))


async def test_tools_render_in_the_prompt_and_none_leaves_them_out(served: Served) -> None:
    plain = await _chat(served, messages=ASK)
    tools = await _chat(served, messages=ASK, tools=[WEATHER])
    none = await _chat(served, messages=ASK, tools=[WEATHER], tool_choice="none")
    assert tools.usage.prompt_tokens > plain.usage.prompt_tokens + 40
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    # A conversation that went through a call and its answer renders too.
    after = await _chat(served, messages=CALLED, tools=[WEATHER])
    assert after.usage.prompt_tokens > tools.usage.prompt_tokens + 20
    assert after.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("params", "field"), [
    ({"messages": ASK, "tool_choice": {"type": "function", "function": {"name": "nope"}},
      "tools": [WEATHER]}, "tool_choice"),
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"messages": [*CALLED[:1], {**CALLED[1], "tool_calls": [
        {**CALLED[1]["tool_calls"][0], "function": {"name": "get_weather",
                                                    "arguments": "[1, 2]"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
async def test_bad_tool_requests_are_400_naming_the_field(
        served: Served, params: dict[str, Any], field: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await _chat(served, **params)
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("InvalidParams", field), error
    await _chat(served, messages=ASK, tools=[WEATHER])


async def test_a_model_without_tool_support_refuses_tools_with_400(
        model_path: str, tmp_path: Path) -> None:
    plain = tmp_path / "no-tools"
    shutil.copytree(model_path, plain)
    config_file = plain / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}"
                               "{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                               "{% endif %}")
    config_file.write_text(json.dumps(config))
    async with open_runtime(config_from_mapping({}), models={"tiny": str(plain)}) as rt:
        served = await serve_http(rt)
        with pytest.raises(openai.BadRequestError) as caught:
            await _chat(served, messages=ASK, tools=[WEATHER])
        assert "does not support tool calling" in caught.value.message
        assert (await _chat(served, messages=ASK)).choices[0].finish_reason in ("stop",
                                                                                 "length")
        served.metrics.close()


# -- tool_choice required and named: constrained, so even random weights call ----------

SEARCH: dict[str, Any] = {
    "type": "function",
    "function": {"name": "search", "description": "Search the web.",
                 "parameters": {"type": "object", "additionalProperties": False,
                                "required": ["query", "limit"],
                                "properties": {"query": {"type": "string", "maxLength": 20},
                                               "limit": {"type": "integer", "minimum": 1,
                                                         "maximum": 9}}}}}


def _check_call(call: Any, name: str | None = None) -> None:
    arguments = json.loads(call.function.arguments)
    assert call.type == "function" and call.id.startswith("call_")
    if name is not None:
        assert call.function.name == name
    if call.function.name == "search":
        assert set(arguments) == {"query", "limit"} and 1 <= arguments["limit"] <= 9
    else:
        assert call.function.name == "get_weather" and set(arguments) == {"city"}


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "search"}}])
async def test_required_and_named_tool_choice_always_give_a_parseable_call(
        served: Served, choice: Any) -> None:
    named = None if choice == "required" else "search"

    def run(client: openai.OpenAI) -> list[Any]:
        replies = []
        for seed in range(6):
            params: dict[str, Any] = {
                "model": "tiny", "messages": ASK, "tools": [WEATHER, SEARCH],
                "tool_choice": choice, "max_tokens": 200, "temperature": 1.0,
                "seed": seed, "parallel_tool_calls": False}
            whole = client.chat.completions.create(**params)
            deltas = [c for c in client.chat.completions.create(**params, stream=True)]
            replies.append((whole, deltas))
        return replies

    for whole, deltas in await served.sync(run):
        choice_out = whole.choices[0]
        assert choice_out.finish_reason == "tool_calls", choice_out
        assert choice_out.message.content is None
        [call] = choice_out.message.tool_calls
        _check_call(call, named)
        streamed = [tc for d in deltas if d.choices for tc in d.choices[0].delta.tool_calls or []]
        assert [(tc.index, tc.function.name, tc.function.arguments) for tc in streamed] == [
            (0, call.function.name, call.function.arguments)]
        assert deltas[-1].choices[0].finish_reason == "tool_calls"


def test_a_tools_round_trip_against_corral_serve(model_path: str) -> None:
    """A real `corral serve` process, driven by the official client: a call, the tool's
    answer, then the final answer."""
    def run(client: openai.OpenAI) -> tuple[Any, Any]:
        first = client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
            max_tokens=100, temperature=0.0)
        [call] = first.choices[0].message.tool_calls
        messages: list[Any] = [
            *ASK, first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C."}]
        final = client.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER], max_tokens=12)
        return first, final

    with serve_process(model_path) as client:
        first, final = run(client)
    _check_call(first.choices[0].message.tool_calls[0], "get_weather")
    assert first.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")
    # The second prompt holds the first: the call and its answer were rendered after it.
    assert final.usage.prompt_tokens > first.usage.prompt_tokens


async def test_required_call_with_a_response_format_is_400(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await _chat(served, messages=ASK, tools=[WEATHER], tool_choice="required",
                    response_format={"type": "json_object"})
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "tool_choice"
    await _chat(served, messages=ASK, tools=[WEATHER], tool_choice="required")


async def test_embedded_and_process_isolation_read_the_same_call(model_path: str) -> None:
    params: dict[str, Any] = {"messages": ASK, "tools": [WEATHER, SEARCH],
                              "tool_choice": {"type": "function",
                                              "function": {"name": "search"}},
                              "max_tokens": 120, "seed": 3, "temperature": 1.0}
    completions = []
    for isolation in ("thread", "process"):
        config = config_from_mapping({"generation": {"isolation": isolation}})
        async with open_runtime(config, models={"tiny": model_path}) as rt:
            completions.append(await rt.complete("tiny", **params))
    thread, process = completions
    assert thread.finish_reason == "tool_calls" and thread.text == ""
    [call] = thread.tool_calls
    _check_call(call, "search")
    assert [c.function for c in process.tool_calls] == [call.function]
    assert process.token_ids == thread.token_ids


async def test_json_rpc_takes_tools_and_streams_the_calls(model_path: str) -> None:
    params: dict[str, Any] = {"messages": ASK, "tools": [WEATHER, SEARCH],
                              "tool_choice": "required", "parallel_tool_calls": False,
                              "max_tokens": 120, "temperature": 1.0, "seed": 5}
    with trio.fail_after(60):
        async with serve_jsonrpc(model_path) as (_, listener):
            client = await Client.connect(listener)
            whole = await client.result("complete", params)
            started = await client.result("generate", params)
            chunks, end = await client.stream_end(started["stream_id"])
            bad = await client.call("complete", {**params, "tools": [], "tool_choice": {
                "type": "function", "function": {"name": "search"}}})
            after = await client.result("complete", {"prompt": "Hello", "max_tokens": 4})
            await client.aclose()
    [call] = whole["tool_calls"]
    assert whole["finish_reason"] == "tool_calls" and whole["text"] == ""
    streamed = [c for chunk in chunks for c in chunk.get("tool_calls", [])]
    assert [c["function"] for c in streamed] == [call["function"]]
    assert end["params"]["finish_reason"] == "tool_calls"
    assert bad["error"]["code"] == -32602 and "tool_choice" in bad["error"]["message"]
    assert after["finish_reason"] == "length"


# Qwen 3 Coder's call format, on the tiny model's weights: a template that mlx_lm reads as
# the `qwen3_coder` parser's (calls as <function=...> and <parameter=...> lines).
QWEN3_CODER_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|># Tools\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}Call one as <tool_call>\n<function=NAME>\n"
    "<parameter=NAME>\nVALUE\n</parameter>\n</function>\n</tool_call>{{ eos_token }}"
    "{% endif %}{% for m in messages %}{{ '<|' + m['role'] + '|>' + (m['content'] or '')"
    " + eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

BOOKING: dict[str, Any] = {
    "type": "function",
    "function": {"name": "book", "parameters": {
        "type": "object", "required": ["city", "nights", "breakfast"],
        "properties": {"city": {"type": "string", "maxLength": 12},
                       "nights": {"type": "integer", "minimum": 1, "maximum": 9},
                       "breakfast": {"type": "boolean"},
                       "room": {"enum": ["single", "double"]}}}}}


async def test_required_calls_in_qwen3_coders_format_parse_and_follow_the_schema(
        model_path: str, tmp_path: Path) -> None:
    coder = tmp_path / "coder"
    shutil.copytree(model_path, coder)
    config_file = coder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = QWEN3_CODER_TEMPLATE
    config_file.write_text(json.dumps(config))
    async with open_runtime(config_from_mapping({}), models={"tiny": str(coder)}) as rt:
        info = rt.list_models()[0].info
        assert info is not None and info.tool_calling is not None
        assert info.tool_calling.parser == "qwen3_coder"
        for seed in range(6):
            reply = await rt.complete("tiny", messages=ASK, tools=[WEATHER, BOOKING],
                                      tool_choice={"type": "function",
                                                   "function": {"name": "book"}},
                                      max_tokens=120, temperature=1.0, seed=seed)
            assert reply.finish_reason == "tool_calls", reply.text
            [call] = reply.tool_calls
            arguments = json.loads(call.function.arguments)
            assert call.function.name == "book"
            assert {"city", "nights", "breakfast"} <= set(arguments) <= {
                "city", "nights", "breakfast", "room"}
            assert isinstance(arguments["city"], str) and 1 <= len(arguments["city"]) <= 12
            assert isinstance(arguments["nights"], int) and 1 <= arguments["nights"] <= 9
            assert isinstance(arguments["breakfast"], bool)
            assert arguments.get("room", "single") in ("single", "double")


# -- forced calls with an open schema always end ------------------------------------------

OPEN_WEATHER: dict[str, Any] = {  # the README's: nothing bounds the city or the keys
    "type": "function",
    "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
OPEN_RECORD: dict[str, Any] = {  # every kind of value, none of them bounded
    "type": "function",
    "function": {"name": "save", "parameters": {
        "type": "object", "properties": {
            "title": {"type": "string"}, "score": {"type": "number"},
            "count": {"type": "integer"}, "tags": {"type": "array",
                                                   "items": {"type": "string"}},
            "flag": {"type": "boolean"}, "extra": {"type": "object"}}}}}


@pytest.mark.slow
@pytest.mark.parametrize("max_tokens", [120, 256])
async def test_required_calls_with_open_schemas_end_and_parse_within_max_tokens(
        served: Served, max_tokens: int) -> None:
    """`tool_choice: required` with schemas that leave strings, numbers, arrays and
    keys open, sampled at temperature 1 with 20 seeds on random weights: every reply
    ends in calls that parse, within max_tokens, with only the listed properties."""
    async def one(seed: int, replies: list[Any]) -> None:
        reply = await served.post("/v1/chat/completions", json={
            "model": "tiny", "messages": ASK, "tools": [OPEN_WEATHER, OPEN_RECORD],
            "tool_choice": "required", "max_tokens": max_tokens, "temperature": 1.0,
            "seed": seed})
        assert reply.status_code == 200, reply.text
        replies.append(reply.json())

    replies: list[Any] = []
    async with trio.open_nursery() as nursery:
        for seed in range(20):
            nursery.start_soon(one, seed, replies)
    assert len(replies) == 20
    for reply in replies:
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None, choice
        assert reply["usage"]["completion_tokens"] <= max_tokens
        assert choice["message"]["tool_calls"]
        for call in choice["message"]["tool_calls"]:
            arguments = json.loads(call["function"]["arguments"])
            listed = OPEN_WEATHER if call["function"]["name"] == "get_weather" else OPEN_RECORD
            assert set(arguments) <= set(listed["function"]["parameters"]["properties"])
            assert arguments.get("extra", {}) == {}  # an open object takes no keys


@pytest.mark.slow
async def test_the_readme_example_runs_as_written(served: Served) -> None:
    """The README's function-calling example, run as a program against this server
    (the tiny model standing in for the default one): it prints a call that parses."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Function calling"):readme.index("## Structured output")]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    assert 'model="smollm2"' in code and "http://127.0.0.1:8000/v1" in code
    code = code.replace('model="smollm2"', 'model="tiny"').replace(
        "http://127.0.0.1:8000", served.base_url)
    done = await trio.run_process([sys.executable, "-c", code], capture_stdout=True,
                                  capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    [line] = done.stdout.decode().splitlines()
    name, arguments = line.split(" ", 1)
    assert name == "get_weather" and arguments.startswith("{'city': ")
