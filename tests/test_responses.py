"""OpenAI's Responses API (issue 23, part 1) over the wire: the tiny model behind a real
HTTP server on 127.0.0.1, driven by the official `openai` client's `responses` methods,
which parse every reply and SSE event into their typed objects. Also the store behind
`previous_response_id` on its own, and vLLM's /tokenize and /detokenize.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest
import trio
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseOutputMessage,
    ResponseTextDeltaEvent,
)

from conftest import wait_until
from corral.config import config_from_mapping
from corral.protocol.errors import CorralError
from corral.protocol.responses import InputItem, TextConfig
from corral.protocol.responses_output import ResponseObject
from corral.runtime import open_runtime
from corral.server.responses import ResponseStore, StoredResponse
from test_http import (  # noqa: F401  (`served` is a fixture)
    CHAT,
    PROMPT,
    Served,
    registry_active,
    serve_http,
    served,
)
from test_runtime import StepTap, engine_steps
from test_serve import serve_process

ASK = "What is the weather in Paris?"
WEATHER: dict[str, Any] = {
    "type": "function", "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "color": {"enum": ["red", "green", "blue"]}},
    "required": ["name", "color"], "additionalProperties": False}

_LIFECYCLE_END = ("response.completed", "response.incomplete")


def _finished(response: Response) -> None:
    """A response that ended as a reply does: completed, or cut at max_output_tokens."""
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete"), response
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None
    assert response.usage.total_tokens == (response.usage.input_tokens
                                           + response.usage.output_tokens)


# -- text, whole and streamed --------------------------------------------------------


async def test_text_is_what_chat_completions_gives_for_the_same_turn(served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[Response, Any]:
        response = client.responses.create(model="tiny", input=CHAT[0]["content"],
                                           max_output_tokens=16)
        chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16)
        return response, chat

    response, chat = await served.sync(run)
    _finished(response)
    [message] = response.output
    assert isinstance(message, ResponseOutputMessage) and message.role == "assistant"
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert (response.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    assert response.model == "tiny" and response.max_output_tokens == 16


async def test_a_stream_sends_the_typed_event_sequence(served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[list[Any], Response]:
        events = list(client.responses.create(model="tiny", input=PROMPT,
                                              max_output_tokens=12, stream=True))
        whole = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=12)
        return events, whole

    events, whole = await served.sync(run)
    types = [event.type for event in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert types[-1] in _LIFECYCLE_END
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event for event in events if isinstance(event, ResponseTextDeltaEvent)]
    assert deltas and all(d.item_id == events[2].item.id for d in deltas)
    last = events[-1]
    assert isinstance(last, ResponseCompletedEvent | ResponseIncompleteEvent)
    _finished(last.response)
    text = "".join(d.delta for d in deltas)
    assert text == last.response.output_text == events[-4].text == whole.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []


async def test_instructions_come_first_and_are_counted(served: Served) -> None:
    instructions = "You answer in one short sentence."

    def run(client: openai.OpenAI) -> tuple[Response, Response, Any]:
        plain = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=4)
        told = client.responses.create(model="tiny", input=PROMPT, instructions=instructions,
                                       max_output_tokens=4)
        chat = client.chat.completions.create(
            model="tiny", max_tokens=4, messages=[{"role": "system", "content": instructions},
                                                  {"role": "user", "content": PROMPT}])
        return plain, told, chat

    plain, told, chat = await served.sync(run)
    assert told.instructions == instructions and plain.instructions is None
    assert told.usage is not None and plain.usage is not None
    assert told.usage.input_tokens == chat.usage.prompt_tokens > plain.usage.input_tokens
    assert told.output_text == chat.choices[0].message.content


# -- function tools ---------------------------------------------------------------------


async def test_a_function_call_round_trip(served: Served) -> None:
    """tool_choice "required" makes even random weights call (the call is constrained);
    its output goes back through previous_response_id, or as explicit items, alike."""
    def run(client: openai.OpenAI) -> tuple[Response, Response, Response, list[Any]]:
        first = client.responses.create(model="tiny", input=ASK, tools=[WEATHER],
                                        tool_choice="required", parallel_tool_calls=False,
                                        max_output_tokens=100)
        [call] = first.output
        assert isinstance(call, ResponseFunctionToolCall)
        answer = {"type": "function_call_output", "call_id": call.call_id,
                  "output": "Sunny, 21 C."}
        continued = client.responses.create(model="tiny", previous_response_id=first.id,
                                            input=[answer], tools=[WEATHER],
                                            max_output_tokens=8)
        explicit = client.responses.create(
            model="tiny", input=[{"role": "user", "content": ASK}, *first.output, answer],
            tools=[WEATHER], max_output_tokens=8)
        streamed = list(client.responses.create(
            model="tiny", input=ASK, tools=[WEATHER], tool_choice="required",
            parallel_tool_calls=False, max_output_tokens=100, stream=True))
        return first, continued, explicit, streamed

    first, continued, explicit, streamed = await served.sync(run)
    assert first.status == "completed" and first.tool_choice == "required"
    [call] = first.output
    assert isinstance(call, ResponseFunctionToolCall) and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id and call.status == "completed"
    assert set(json.loads(call.arguments)) == {"city"}
    assert first.output_text == ""
    _finished(continued)
    assert continued.previous_response_id == first.id
    assert continued.usage is not None and explicit.usage is not None
    assert first.usage is not None
    assert continued.usage.input_tokens == explicit.usage.input_tokens
    assert continued.usage.input_tokens > first.usage.input_tokens
    assert continued.output_text == explicit.output_text  # greedy: the same prompt
    types = [event.type for event in streamed]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:7] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    assert streamed[2].item.type == "function_call" and streamed[2].item.arguments == ""
    assert streamed[4].arguments == streamed[5].item.arguments == streamed[3].delta
    # Greedy and constrained: the streamed call is the call.
    assert (streamed[5].item.name, streamed[5].item.arguments) == (call.name, call.arguments)


class Record(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    color: Literal["red", "green", "blue"]


async def test_text_format_json_schema_gives_json_the_schema_accepts(served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[list[Response], Any, Any]:
        responses = [client.responses.create(
            model="tiny", input="Describe a record as JSON.", max_output_tokens=96,
            temperature=1.0, extra_body={"seed": seed},
            text={"format": {"type": "json_schema", "name": "record", "schema": SCHEMA,
                             "strict": True}}) for seed in range(3)]
        # The SDK's helpers send a Pydantic model's schema and parse the reply into
        # it; the stream helper rebuilds the response from the events, checking their
        # indexes and items as it goes.
        parsed = client.responses.parse(model="tiny", input="A record:", text_format=Record,
                                        max_output_tokens=96)
        with client.responses.stream(model="tiny", input="A record:", text_format=Record,
                                     max_output_tokens=96) as stream:
            streamed = stream.get_final_response()
        return responses, parsed, streamed

    responses, parsed, streamed = await served.sync(run)
    for response in responses:
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), SCHEMA)
        assert response.text is not None and response.text.format is not None
        assert response.text.format.type == "json_schema"
    assert isinstance(parsed.output_parsed, Record)
    assert streamed.output_parsed == parsed.output_parsed  # greedy either way
    assert streamed.id != parsed.id and streamed.id.startswith("resp_")


# -- the store ---------------------------------------------------------------------------


async def test_previous_response_id_continues_and_store_false_keeps_nothing(
        served: Served) -> None:
    def run(client: openai.OpenAI) -> dict[str, Any]:
        got: dict[str, Any] = {}
        got["first"] = client.responses.create(model="tiny", input="Hi there.",
                                               max_output_tokens=6)
        got["next"] = client.responses.create(model="tiny", input="Tell me more.",
                                              previous_response_id=got["first"].id,
                                              max_output_tokens=6)
        got["explicit"] = client.responses.create(model="tiny", max_output_tokens=6, input=[
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": got["first"].output_text},
            {"role": "user", "content": "Tell me more."}])
        got["retrieved"] = client.responses.retrieve(got["first"].id)
        got["unstored"] = client.responses.create(model="tiny", input="Hi.",
                                                  max_output_tokens=2, store=False)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(got["unstored"].id)
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="tiny", input="Hi.",
                                    previous_response_id=got["unstored"].id)
        got["unknown"] = caught.value
        client.responses.delete(got["first"].id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(got["first"].id)
        return got

    got = await served.sync(run)
    assert got["next"].usage.input_tokens == got["explicit"].usage.input_tokens
    assert got["next"].output_text == got["explicit"].output_text
    assert got["retrieved"].id == got["first"].id
    assert got["retrieved"].output_text == got["first"].output_text
    assert got["unstored"].store is False
    body = got["unknown"].body
    assert body["param"] == "previous_response_id" and body["code"] == "InvalidParams"


def _stored(response_id: str) -> StoredResponse:
    response = ResponseObject(
        id=response_id, created_at=0, model="m", status="completed", output=[], usage=None,
        instructions=None, max_output_tokens=None, temperature=0.0, top_p=1.0, tools=[],
        tool_choice="auto", parallel_tool_calls=True, previous_response_id=None,
        text=TextConfig(), store=True, metadata={}, user=None)
    return StoredResponse(response, [InputItem(role="user", content=response_id)])


def test_the_store_keeps_the_most_recently_used() -> None:
    store = ResponseStore(2)
    for name in ("a", "b"):
        store.put(_stored(name))
    assert store.get("a") is not None  # a is now the most recent
    store.put(_stored("c"))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert store.delete("a") and not store.delete("a")
    empty = ResponseStore(0)
    empty.put(_stored("a"))
    assert empty.get("a") is None


# -- errors and disconnects --------------------------------------------------------------


async def test_errors_are_openai_errors_and_the_next_request_is_served(served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[list[openai.APIStatusError], Response]:
        errors = []
        attempts: list[dict[str, Any]] = [
            {"model": "nope", "input": "Hi."},
            {"model": "nope", "input": "Hi.", "stream": True},
            {"model": "tiny", "input": "Hi.", "temperature": 5.0},
            {"model": "tiny", "input": "Hi.", "extra_body": {"bogus": 1}},
            {"model": "tiny", "input": "Hi.", "tools": [{"type": "web_search"}]},
            {"model": "tiny", "input": [{"type": "function_call", "name": "f"}]},
            {"model": "tiny", "input": [], "instructions": "Be brief."},
        ]
        for attempt in attempts:
            with pytest.raises(openai.APIStatusError) as caught:
                client.responses.create(**attempt)
            errors.append(caught.value)
        return errors, client.responses.create(model="tiny", input="Hi.", max_output_tokens=3)

    errors, served_after = await served.sync(run)
    assert [type(e) for e in errors] == [openai.NotFoundError] * 2 + [
        openai.BadRequestError] * 5
    assert [e.body["param"] for e in errors[2:]] == [
        "temperature", "bogus", "tools[0].type", "input[0].call_id", "input"]
    assert errors[0].body["code"] == "ModelNotLoaded"
    _finished(served_after)


async def test_a_failure_mid_stream_is_the_response_failed_event(served: Served) -> None:
    rt = served.rt

    def run(client: openai.OpenAI) -> list[Any]:
        # Sampled without a seed, so the runtime cannot resume it after the crash.
        events = []
        for event in client.responses.create(model="tiny", input=PROMPT, temperature=0.8,
                                             max_output_tokens=2000, stream=True):
            events.append(event)
            if event.type == "response.output_text.delta" and len(events) == 5:
                trio.from_thread.run(rt.inject_fault, "tiny", "raise")
        return events

    events = await served.sync(run)
    last = events[-1]
    assert last.type == "response.failed" and last.response.status == "failed"
    assert last.response.error.code == "GenerationError"
    assert last.sequence_number == len(events) - 1
    assert last.response.output and last.response.output[0].content[0].text

    async def reloaded() -> bool:  # the restarted model answers once its engine loaded
        try:
            await rt.tokenize("tiny", "x")
        except CorralError:
            return False
        return True

    await wait_until(reloaded)
    after = await served.sync(lambda c: c.responses.create(model="tiny", input="Hi.",
                                                           max_output_tokens=3))
    _finished(after)


async def _no_stream_runs(served: Served) -> bool:
    return await registry_active(served.rt) == 0


async def test_a_client_that_disconnects_mid_stream_stops_its_sequence(
        served: Served) -> None:
    tap = StepTap(served.rt)

    def run(client: openai.OpenAI) -> int:
        stream = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=2000,
                                         stream=True)
        seen = 0
        for _ in stream:
            seen += 1
            if seen == 8:
                break
        stream.close()
        return seen

    assert await served.sync(run) == 8
    rt = served.rt
    await wait_until(lambda: _no_stream_runs(served))
    cancelled_at = engine_steps(rt)
    [stream_id] = {sid for _, ids in tap.steps for sid in ids}
    await rt.complete("tiny", PROMPT, max_tokens=8)  # keep the engine stepping
    assert max(tap.steps_of(stream_id)) <= cancelled_at + 1  # it left the batch
    text = await served.metrics.render()
    assert b'corral_requests_total{code="Cancelled",outcome="cancelled"} 1.0' in text


# -- /tokenize and /detokenize -------------------------------------------------------------


async def test_tokenize_and_detokenize_round_trip(served: Served) -> None:
    tokenized = await served.post("/tokenize", json={"model": "tiny", "prompt": PROMPT})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    assert body["tokens"] == await served.rt.tokenize("tiny", PROMPT)
    assert body["count"] == len(body["tokens"])
    [model] = served.rt.list_models()
    assert model.info is not None and body["max_model_len"] == model.info.max_context
    back = await served.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]})
    assert back.status_code == 200
    assert back.json() == {"prompt": await served.rt.detokenize("tiny", body["tokens"])}
    assert PROMPT in back.json()["prompt"]

    chat = await served.sync(lambda c: c.chat.completions.create(model="tiny", messages=CHAT,
                                                                 max_tokens=1))
    as_chat = await served.post("/tokenize", json={"messages": CHAT})  # the only model
    assert as_chat.json()["count"] == chat.usage.prompt_tokens

    refused = [await served.post("/tokenize", json={"model": "tiny"}),
               await served.post("/tokenize", json={"model": "nope", "prompt": "x"}),
               await served.post("/detokenize", json={"model": "tiny", "tokens": [-1]}),
               await served.post("/detokenize", json={"model": "tiny", "tokens": [10**9]})]
    assert [r.status_code for r in refused] == [400, 404, 400, 400]
    assert [r.json()["error"]["code"] for r in refused] == [
        "InvalidParams", "ModelNotLoaded", "InvalidParams", "TokenizerError"]


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_tokenize_routes_take_post_only(served: Served, path: str) -> None:
    assert (await served.get(path)).status_code == 405


async def test_server_responses_max_stored_bounds_the_store(model_path: str) -> None:
    config = config_from_mapping({"server": {"responses": {"max_stored": 1}}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        server = await serve_http(rt)

        def run(client: openai.OpenAI) -> tuple[str, str]:
            first = client.responses.create(model="tiny", input="Hi.", max_output_tokens=2)
            second = client.responses.create(model="tiny", input="Hi.", max_output_tokens=2)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(first.id)
            return second.id, client.responses.retrieve(second.id).id

        second, retrieved = await server.sync(run)
        assert retrieved == second
        server.metrics.close()


@pytest.mark.slow
def test_a_conversation_against_corral_serve(model_path: str) -> None:
    """A real `corral serve` process: a tool call, its output continued through
    `previous_response_id`, streamed."""
    with serve_process(model_path) as client:
        first = client.responses.create(model="tiny", input=ASK, tools=[WEATHER],
                                        tool_choice="required", parallel_tool_calls=False,
                                        max_output_tokens=100)
        [call] = first.output
        assert isinstance(call, ResponseFunctionToolCall)
        events = list(client.responses.create(
            model="tiny", previous_response_id=first.id, tools=[WEATHER], stream=True,
            input=[{"type": "function_call_output", "call_id": call.call_id,
                    "output": "Sunny, 21 C."}], max_output_tokens=8))
    assert events[-1].type in _LIFECYCLE_END
    _finished(events[-1].response)
    assert first.usage is not None and events[-1].response.usage is not None
    assert events[-1].response.usage.input_tokens > first.usage.input_tokens
