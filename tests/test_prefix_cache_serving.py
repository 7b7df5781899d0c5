"""The prefix cache as clients see it: OpenAI usage over HTTP (whole and streamed), the
Prometheus counters, the runtime's statistics, and JSON-RPC usage and state.

The servers and clients are those of test_http and test_jsonrpc_server: a real corral
server on 127.0.0.1, the official `openai` client, and a JSON-RPC client over TCP.
"""

from __future__ import annotations

import random
from typing import Any

import openai
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families
from test_http import Served, served  # noqa: F401  (`served` is a fixture)
from test_jsonrpc_server import Client, serve

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
_WORDS = ("the river runs through the valley and in spring the water is cold and clear "
          "every morning he walks to the station and waits for the train while the "
          "farmer watches from the gate").split()


def _long_text(seed: int, words: int) -> str:
    """Plain words, seeded; the tiny tokenizer makes about 1.75 tokens of each."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


SYSTEM = _long_text(1, 230)
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Tell me about the river."}]


async def test_a_repeated_chat_reports_its_cached_prompt_and_answers_the_same(
        served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[Any, Any, list[Any]]:
        first = client.chat.completions.create(model="tiny", messages=CHAT,
                                               max_tokens=MAX_TOKENS)
        second = client.chat.completions.create(model="tiny", messages=CHAT,
                                                max_tokens=MAX_TOKENS)
        streamed = list(client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}))
        return first, second, streamed

    first, second, streamed = await served.sync(run)
    prompt_tokens = first.usage.prompt_tokens
    assert prompt_tokens >= 300, "the system prompt is long"
    assert first.usage.completion_tokens > 0
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # A whole-prompt hit leaves the last prompt token to prefill.
    assert second.usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
    assert second.usage.prompt_tokens == prompt_tokens
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.choices[0].finish_reason == first.choices[0].finish_reason
    usage = streamed[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
    assert usage.completion_tokens == first.usage.completion_tokens
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert content == first.choices[0].message.content


def _prefix_cache_samples(text: str) -> dict[str, float]:
    """The prefix cache samples of the model `tiny` in a Prometheus exposition."""
    return {sample.name: sample.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("corral_prefix_cache")
            for sample in family.samples if sample.labels == {"model": "tiny"}}


async def test_metrics_and_runtime_statistics_count_the_hits(
        served: Served) -> None:
    prompt = _long_text(2, 200)

    def run(client: openai.OpenAI) -> list[Any]:
        return [client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS)
                for _ in range(2)]

    first, second = await served.sync(run)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert cached == second.usage.prompt_tokens - 1
    assert second.choices[0].text == first.choices[0].text

    statistics = (await served.rt.statistics()).prefix_cache["tiny"]
    assert statistics.enabled
    assert statistics.hits == cached
    assert statistics.queries == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert statistics.bytes > 0
    assert served.rt.prefix_cache_statistics() == {"tiny": statistics}

    response = await served.get("/metrics")
    assert response.status_code == 200
    samples = _prefix_cache_samples(response.text)
    assert samples["corral_prefix_cache_queries_total"] == statistics.queries
    assert samples["corral_prefix_cache_hits_total"] == statistics.hits > 0
    assert samples["corral_prefix_cache_bytes"] == statistics.bytes


async def test_json_rpc_usage_and_state_carry_the_prefix_cache(model_path: str) -> None:
    params = {"prompt": _long_text(3, 200), "max_tokens": MAX_TOKENS}
    with trio.fail_after(30):
        async with serve(model_path) as (_, listener):
            client = await Client.connect(listener)
            first = await client.result("complete", params)
            second = await client.result("complete", params)
            started = await client.result("generate", params)
            chunks, end = await client.stream_end(started["stream_id"])
            state = await client.result("runtime/state")
            await client.aclose()
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": prompt_tokens - 1}
    assert second["text"] == first["text"]
    assert end["method"] == "stream.end"
    assert end["params"]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": prompt_tokens - 1}
    assert "".join(c["text"] for c in chunks) == first["text"]
    tiny = state["prefix_cache"]["tiny"]
    assert tiny["enabled"] is True
    assert tiny["hits"] == 2 * (prompt_tokens - 1)
    assert tiny["queries"] == 3 * prompt_tokens
