"""Anthropic's Messages API (issue 23, part 2): POST /v1/messages and
/v1/messages/count_tokens, driven by the official `anthropic` client against the real
HTTP server on 127.0.0.1 serving the tiny model (whose chat template renders tools as
Qwen 2.5's does).

Every failure is checked as the client sees it, then a request is served after it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx
import pytest
import trio

from conftest import wait_until
from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import CorralError
from corral.runtime import open_runtime
from test_http import Served, registry_active, serve_http
from test_runtime import StepTap

pytestmark = pytest.mark.slow

ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER: dict[str, Any] = {
    "name": "get_weather", "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string",
                                                                "maxLength": 12}},
                     "required": ["city"], "additionalProperties": False}}


def config(**sections: dict[str, Any]) -> RuntimeConfig:
    """test_http's test configuration, with `sections` merged in."""
    base: dict[str, Any] = {
        "stream_registry": {"max_active_streams": 16, "max_queued": 4},
        "supervision": {"backoff": {"min_ms": 1, "max_ms": 10}},
        "python_runtime": {"restart_delay_base_ms": 1, "restart_delay_max_ms": 10},
        "server": {"drain_timeout_ms": 1000}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return config_from_mapping(base)


def client_of(served: Served, **options: Any) -> anthropic.Anthropic:
    options.setdefault("api_key", "x")
    return anthropic.Anthropic(base_url=served.base_url, max_retries=0, **options)


async def run(served: Served, fn: Callable[[anthropic.Anthropic], Any], **options: Any) -> Any:
    """`fn(client)` with a sync Anthropic client, in a worker thread."""
    def call() -> Any:
        with client_of(served, **options) as client:
            return fn(client)

    return await trio.to_thread.run_sync(call)


async def served_after(served: Served) -> None:
    """A request after a failure is served."""
    reply = await run(served, lambda c: c.messages.create(
        model="tiny", max_tokens=3, messages=ASK))
    assert reply.stop_reason in ("max_tokens", "end_turn")
    assert reply.usage.output_tokens >= 1


@pytest.fixture
async def served(model_path: str) -> AsyncIterator[Served]:
    async with open_runtime(config(), models={"tiny": model_path}) as rt:
        server = await serve_http(rt)
        yield server
        server.metrics.close()


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of an SSE body."""
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# -- text ---------------------------------------------------------------------------------


async def test_text_with_a_system_prompt_and_blocks(served: Served) -> None:
    def call(client: anthropic.Anthropic) -> tuple[Any, Any]:
        plain = client.messages.create(model="tiny", max_tokens=8, system="Be brief.",
                                       messages=ASK)
        blocks = client.messages.create(
            model="tiny", max_tokens=8,
            system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is the weather "},
                {"type": "text", "text": "in Paris?", "cache_control": {"type": "ephemeral"}}]}])
        return plain, blocks

    plain, blocks = await run(served, call)
    assert plain.type == "message" and plain.role == "assistant" and plain.model == "tiny"
    assert plain.id.startswith("msg_")
    [text] = plain.content
    assert text.type == "text" and text.text
    assert plain.stop_reason == "max_tokens" and plain.stop_sequence is None
    assert plain.usage.output_tokens == 8
    prompt = plain.usage.input_tokens + (plain.usage.cache_read_input_tokens or 0)
    assert prompt > 0
    # Blocks are joined: the same prompt, the same (greedy) reply.
    assert blocks.content[0].text == text.text
    assert (blocks.usage.input_tokens + (blocks.usage.cache_read_input_tokens or 0)) == prompt


async def test_stop_sequences_end_the_reply_and_are_named(served: Served) -> None:
    def call(client: anthropic.Anthropic) -> tuple[Any, Any]:
        first = client.messages.create(model="tiny", max_tokens=24, messages=ASK)
        text = first.content[0].text
        stop = next(text[i:i + 2] for i in range(4, len(text) - 1)
                    if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
        second = client.messages.create(model="tiny", max_tokens=24, messages=ASK,
                                        stop_sequences=["never-said-zzz", stop])
        return (text, stop), second

    (text, stop), second = await run(served, call)
    assert second.stop_reason == "stop_sequence"
    assert second.stop_sequence == stop
    assert second.content[0].text == text[:text.find(stop)]


# -- streaming ----------------------------------------------------------------------------


async def test_streaming_sends_anthropics_event_sequence(served: Served) -> None:
    body = {"model": "tiny", "max_tokens": 6, "messages": ASK, "stream": True}
    response = await served.post("/v1/messages", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0 and start["usage"]["output_tokens"] == 0
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6

    def call(client: anthropic.Anthropic) -> tuple[str, Any, Any]:
        with client.messages.stream(model="tiny", max_tokens=6, messages=ASK) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        whole = client.messages.create(model="tiny", max_tokens=6, messages=ASK)
        return streamed, final, whole

    streamed, final, whole = await run(served, call)
    assert streamed == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6


# -- tools --------------------------------------------------------------------------------


def _input_of(block: Any) -> dict[str, Any]:
    assert block.type == "tool_use" and block.name == "get_weather" and block.id
    assert set(block.input) == {"city"} and isinstance(block.input["city"], str)
    return dict(block.input)


async def test_a_tool_round_trip(served: Served) -> None:
    """tool_choice any: a tool_use block that parses; then the tool's result; then the
    answer, whose prompt held the call and its result."""
    def call(client: anthropic.Anthropic) -> tuple[Any, Any]:
        first = client.messages.create(model="tiny", max_tokens=100, messages=ASK,
                                       tools=[WEATHER], tool_choice={"type": "any"})
        [use] = [b for b in first.content if b.type == "tool_use"]
        final = client.messages.create(
            model="tiny", max_tokens=12, tools=[WEATHER],
            messages=[*ASK, {"role": "assistant", "content": first.content},
                      {"role": "user", "content": [
                          {"type": "tool_result", "tool_use_id": use.id,
                           "content": "Sunny, 21 C."}]}])
        return first, final

    first, final = await run(served, call)
    assert first.stop_reason == "tool_use"
    _input_of(first.content[-1])
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert all(block.type == "text" for block in final.content)
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > (
        first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0))


async def test_a_named_tool_streams_as_a_tool_use_block(served: Served) -> None:
    def call(client: anthropic.Anthropic) -> tuple[Any, Any]:
        params: dict[str, Any] = {
            "model": "tiny", "max_tokens": 100, "messages": ASK, "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "get_weather",
                            "disable_parallel_tool_use": True}}
        with client.messages.stream(**params) as stream:
            kinds = [event.type for event in stream]
            streamed = stream.get_final_message()
        return kinds, streamed

    kinds, streamed = await run(served, call)
    assert streamed.stop_reason == "tool_use"
    [use] = streamed.content
    _input_of(use)
    assert "content_block_start" in kinds and kinds[-1] == "message_stop"


async def test_tool_choice_none_leaves_the_tools_out(served: Served) -> None:
    def call(client: anthropic.Anthropic) -> tuple[Any, Any]:
        without = client.messages.create(model="tiny", max_tokens=2, messages=ASK)
        none = client.messages.create(model="tiny", max_tokens=2, messages=ASK,
                                      tools=[WEATHER], tool_choice={"type": "none"})
        return without, none

    without, none = await run(served, call)
    assert none.usage.input_tokens + (none.usage.cache_read_input_tokens or 0) == (
        without.usage.input_tokens + (without.usage.cache_read_input_tokens or 0))


async def test_count_tokens_is_the_prompt_a_request_has(served: Served) -> None:
    def call(client: anthropic.Anthropic) -> tuple[Any, Any, Any]:
        counted = client.messages.count_tokens(model="tiny", messages=ASK, tools=[WEATHER],
                                               system="Be brief.")
        made = client.messages.create(model="tiny", max_tokens=1, messages=ASK,
                                      tools=[WEATHER], system="Be brief.")
        bare = client.messages.count_tokens(model="tiny", messages=ASK, system="Be brief.")
        return counted, made, bare

    counted, made, bare = await run(served, call)
    assert counted.input_tokens == made.usage.input_tokens + (
        made.usage.cache_read_input_tokens or 0)
    assert bare.input_tokens < counted.input_tokens


# -- errors -------------------------------------------------------------------------------


async def test_an_unknown_model_is_not_found_error_404(served: Served) -> None:
    def call(client: anthropic.Anthropic) -> anthropic.NotFoundError:
        with pytest.raises(anthropic.NotFoundError) as caught:
            client.messages.create(model="nope", max_tokens=4, messages=ASK)
        return caught.value

    error = await run(served, call)
    assert error.status_code == 404
    assert isinstance(error.body, dict)
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "not_found_error"
    assert error.body["error"]["code"] == "ModelNotLoaded"
    assert "nope" in error.body["error"]["message"]
    await served_after(served)


async def test_client_errors_are_400_invalid_request_error(served: Served) -> None:
    missing = await served.post("/v1/messages", json={"model": "tiny", "messages": ASK})
    assert missing.status_code == 400
    body = missing.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    assert body["request_id"] == missing.headers["x-request-id"]

    def call(client: anthropic.Anthropic) -> list[anthropic.BadRequestError]:
        errors = []
        for params in [
                {"extra_body": {"temperature": 5.0}},
                {"messages": [{"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": "iVBORw0KGgo="}}]}]},
                {"tool_choice": {"type": "tool", "name": "missing"}, "tools": [WEATHER]},
                {"tool_choice": {"type": "any"}}]:
            with pytest.raises(anthropic.BadRequestError) as caught:
                client.messages.create(**{"model": "tiny", "max_tokens": 4,
                                          "messages": ASK, **params})
            errors.append(caught.value)
        return errors

    temperature, image, named, no_tools = await run(served, call)
    for error in (temperature, image, named, no_tools):
        assert error.status_code == 400
        assert error.body["error"]["type"] == "invalid_request_error", error.body
    assert "temperature" in temperature.body["error"]["message"]
    assert "image blocks are not supported" in image.body["error"]["message"]
    assert "messages[0].content[0]" in image.body["error"]["message"]
    assert "missing" in named.body["error"]["message"]
    assert "tool_choice" in no_tools.body["error"]["message"]
    await served_after(served)


async def test_an_error_mid_stream_is_an_error_event(served: Served) -> None:
    rt = served.rt

    def call(client: anthropic.Anthropic) -> tuple[str, anthropic.APIStatusError]:
        # Sampled without a seed, so the runtime cannot resume it after the crash.
        # (This client sends no `temperature` of its own: it goes as an extra field.)
        stream = client.messages.create(model="tiny", max_tokens=2000, messages=ASK,
                                        stream=True, extra_body={"temperature": 0.8})
        text, injected = "", False
        with pytest.raises(anthropic.APIStatusError) as caught:
            for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    text += event.delta.text
                if len(text) > 3 and not injected:
                    injected = True
                    trio.from_thread.run(rt.inject_fault, "tiny", "raise")
        return text, caught.value

    text, error = await run(served, call)
    assert text
    assert isinstance(error.body, dict) and error.body["type"] == "error"
    assert error.body["error"]["type"] == "api_error"
    assert error.body["error"]["code"] == "GenerationError"

    async def reloaded() -> bool:
        try:
            await rt.tokenize("tiny", "x")
        except CorralError:
            return False
        return True

    await wait_until(reloaded, timeout=60)
    await served_after(served)


async def test_a_disconnect_mid_stream_frees_the_only_slot(model_path: str) -> None:
    one_slot = config(stream_registry={"max_active_streams": 1, "max_queued": 0})
    async with open_runtime(one_slot, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        tap = StepTap(rt)

        def call(client: anthropic.Anthropic) -> int:
            seen = 0
            with client.messages.stream(model="tiny", max_tokens=2000,
                                        messages=ASK) as stream:
                for _ in stream.text_stream:
                    seen += 1
                    if seen == 5:
                        break
            return seen

        assert await run(served, call) == 5
        await wait_until(lambda: _none_active(rt))
        stopped_at = tap.last_step()
        await served_after(served)  # the one slot is free
        [stream_id, *_] = sorted({sid for _, ids in tap.steps for sid in ids})
        # It left the batch at the step it was cancelled at (or the one under way).
        assert max(tap.steps_of(stream_id)) <= stopped_at + 1
        assert len(tap.steps_of(stream_id)) < 1000
        text = await served.metrics.render()
        assert b'corral_requests_total{code="Cancelled",outcome="cancelled"} 1.0' in text
        served.metrics.close()


async def _none_active(rt: Any) -> bool:
    return await registry_active(rt) == 0


async def test_the_errors_of_unknown_methods_take_anthropics_shape(served: Served) -> None:
    response = await trio.to_thread.run_sync(
        lambda: httpx.get(f"{served.base_url}/v1/messages", timeout=10))
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["type"] == "error"
