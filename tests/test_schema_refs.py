"""Local `$ref`s in schemas (issue 21, item 11): a `$ref` cycle that admits no finite
value is a 400 GuidanceError naming the cycle (it gave 200 with content "" before); a
recursive schema that can end stays allowed; and a tool's parameters with `$defs`, as
Pydantic writes them, work under `tool_choice` required and named (their pointers did
not resolve once nested under `arguments`).

The tiny model has random weights: whatever it writes is the grammar's doing, so each
output is checked with `jsonschema` against the schema the client sent.
"""

# ruff: noqa: F811  (tests take the imported `served` fixture as a parameter)
from __future__ import annotations

import enum
import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from corral.config import config_from_mapping
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.schema_refs import check_ref_cycles, nest_refs
from corral.runtime import open_runtime
from test_http import Served, served  # noqa: F401  (the fixture, which tests name)
from test_tools import ASK, QWEN3_CODER_TEMPLATE

pytestmark = pytest.mark.slow

SELF = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}


class Color(enum.StrEnum):
    RED = "red"
    GREEN = "green"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    color: Color


class Adoption(pydantic.BaseModel):
    pet: Pet
    collar: Color
    nights: int = pydantic.Field(ge=1, le=9)


ADOPTION = Adoption.model_json_schema()  # properties {"pet": {"$ref": "#/$defs/Pet"}, ...}
ADOPT = {"type": "function", "function": {"name": "adopt", "parameters": ADOPTION}}
TREE = {"$ref": "#/$defs/node", "$defs": {"node": {
    "type": "object", "additionalProperties": False, "required": ["v"],
    "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                   "kids": {"type": "array", "maxItems": 2,
                            "items": {"$ref": "#/$defs/node"}}}}}}


def _refused(schema: Any) -> list[str]:
    with pytest.raises(EngineClientError) as refused:
        check_ref_cycles(schema, "response_format")
    assert refused.value.code is Code.GUIDANCE_ERROR
    assert refused.value.details["field"] == "response_format"
    cycle: list[str] = refused.value.details["cycle"]
    assert " -> ".join([*cycle, cycle[0]]) in refused.value.message
    return cycle


def test_cycles_without_a_way_out_are_named_and_recursion_that_can_end_is_allowed() -> None:
    assert _refused(SELF) == ["#/$defs/a"]
    assert _refused({"$ref": "#/$defs/a", "$defs": {
        "a": {"allOf": [{"$ref": "#/$defs/b"}]},
        "b": {"type": "object", "required": ["x"],
              "properties": {"x": {"$ref": "#/$defs/a"}}}}}) == ["#/$defs/a", "#/$defs/b"]
    must_nest = {"type": "object", "required": ["next"], "properties": {"next": {"$ref": "#"}}}
    assert _refused(must_nest) == ["#"]
    assert _refused({"type": "array", "minItems": 1, "items": {"$ref": "#"}}) == ["#"]
    for can_end in (
            TREE, ADOPTION,
            {**must_nest, "required": []},  # "next" may be left out
            {"type": "array", "items": {"$ref": "#"}},  # [] ends it
            {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
            {"type": ["object", "null"], "required": ["n"], "properties": {"n": {"$ref": "#"}}},
            {"type": "string", "$defs": {"unused": {"$ref": "#/$defs/unused"}}},
            {"type": "object", "properties": {"default": {"$ref": "#/$defs/s"}},
             "$defs": {"s": {"type": "string"}}, "default": {"$ref": "#/not/a/schema"}}):
        check_ref_cycles(can_end, "response_format")


def test_nested_references_point_below_their_new_place() -> None:
    assert nest_refs({"$ref": "#", "properties": {"enum": {"$ref": "#/$defs/x"}},
                      "default": {"$ref": "#/data"}, "items": [{"$ref": "#/$defs/y"}]},
                     "#/$defs/tool0") == {
        "$ref": "#/$defs/tool0", "properties": {"enum": {"$ref": "#/$defs/tool0/$defs/x"}},
        "default": {"$ref": "#/data"}, "items": [{"$ref": "#/$defs/tool0/$defs/y"}]}


async def _chat(served: Served, **params: Any) -> Any:
    return await served.sync(lambda client: client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=160, temperature=1.0, **params))


def _format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


async def test_a_ref_cycle_in_a_response_format_is_400_naming_it_and_a_tree_is_served(
        served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await _chat(served, response_format=_format(SELF))
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == Code.GUIDANCE_ERROR.value
    assert body["param"] == "response_format"
    assert "$ref cycle #/$defs/a -> #/$defs/a admits no finite value" in body["message"]
    for seed in range(3):
        reply = await _chat(served, response_format=_format(TREE), seed=seed)
        if reply.choices[0].finish_reason == "stop":  # a tree may outgrow max_tokens
            jsonschema.validate(json.loads(reply.choices[0].message.content), TREE)
    assert (await _chat(served)).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "adopt"}}])
async def test_pydantic_parameters_with_defs_give_calls_that_validate(
        served: Served, choice: Any) -> None:
    for seed in range(4):
        reply = await _chat(served, tools=[ADOPT], tool_choice=choice, seed=seed,
                            parallel_tool_calls=False)
        assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "adopt"
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, ADOPTION)
        Adoption.model_validate(arguments)


async def test_a_ref_cycle_in_forced_tool_parameters_is_400_and_the_next_call_is_served(
        served: Served) -> None:
    looping = {"type": "function", "function": {"name": "loop", "parameters": SELF}}
    with pytest.raises(openai.BadRequestError) as caught:
        await _chat(served, tools=[ADOPT, looping], tool_choice="required")
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == Code.GUIDANCE_ERROR.value
    assert body["param"] == "tools"
    assert body["message"].startswith("tools[1].function.parameters: the $ref cycle")
    reply = await _chat(served, tools=[ADOPT, looping],
                        tool_choice={"type": "function", "function": {"name": "adopt"}})
    jsonschema.validate(json.loads(reply.choices[0].message.tool_calls[0].function.arguments),
                        ADOPTION)


async def test_pydantic_parameters_with_defs_in_qwen3_coders_format(
        model_path: str, tmp_path: Path) -> None:
    coder = tmp_path / "coder"
    shutil.copytree(model_path, coder)
    config_file = coder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = QWEN3_CODER_TEMPLATE
    config_file.write_text(json.dumps(config))
    async with open_runtime(config_from_mapping({}), models={"tiny": str(coder)}) as rt:
        for seed in range(4):
            reply = await rt.complete("tiny", messages=ASK, tools=[ADOPT],
                                      tool_choice={"type": "function",
                                                   "function": {"name": "adopt"}},
                                      max_tokens=160, temperature=1.0, seed=seed)
            assert reply.finish_reason == "tool_calls", reply.text
            [call] = reply.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), ADOPTION)
