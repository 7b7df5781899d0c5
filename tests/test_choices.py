"""`n` 1-8 (issue 14, item 3): n sequences of one request in the batch, sharing the
prompt's prefill; seeded choices reproducible and different; usage counting the prompt
once; each choice streamed with its index and finish reason; cancellation and failure
ending every choice. Over HTTP with the official `openai` client, JSON-RPC and embedded.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import httpx
import openai
import pytest
import trio

from conftest import wait_until
from corral import open_runtime
from corral.config import config_from_mapping
from corral.protocol.errors import Code, CorralError
from corral.runtime import Runtime
from corral.server.jsonrpc import JsonRpcListener
from test_http import Served, registry_active, served  # noqa: F401  (the fixture)
from test_jsonrpc_server import Client
from test_serve import Server, free_port

pytestmark = pytest.mark.slow

PROMPT = "Please send the report by Friday so that"
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]


async def test_n_3_gives_3_seeded_choices_reproducible_and_different(served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[Any, Any, Any]:
        def ask(n: int) -> Any:
            return client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7, n=n)

        return ask(3), ask(3), ask(1)

    first, second, single = await served.sync(run)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in second.choices]
    assert len(set(texts)) > 1  # temperature 1, a seed per choice
    assert texts[0] == single.choices[0].message.content  # choice 0 keeps the seed
    assert all(choice.finish_reason in ("stop", "length") for choice in first.choices)
    # The prompt counts once, the tokens of every choice add up.
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    tokens = [len(await served.rt.tokenize("tiny", t, add_special_tokens=False))
              for t in texts]
    assert first.usage.completion_tokens >= max(tokens)
    completion = await served.rt.complete("tiny", PROMPT, max_tokens=12, temperature=1.0,
                                          seed=7, n=3)
    assert completion.usage.completion_tokens == sum(len(c.token_ids)
                                                     for c in completion.choices)
    assert completion.text == completion.choices[0].text


async def test_streamed_choices_carry_their_index_and_finish_reason(served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[Any, list[Any]]:
        params: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10,
                                  "temperature": 1.0, "seed": 3, "n": 3, "logprobs": 2}
        whole = client.completions.create(**params)
        chunks = list(client.completions.create(
            **params, stream=True, stream_options={"include_usage": True}))
        return whole, chunks

    whole, chunks = await served.sync(run)
    text: dict[int, str] = defaultdict(str)
    tokens: dict[int, list[str]] = defaultdict(list)
    finishes: dict[int, list[str]] = defaultdict(list)
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        text[choice.index] += choice.text
        if choice.logprobs is not None:
            tokens[choice.index].extend(choice.logprobs.tokens)
        if choice.finish_reason is not None:
            finishes[choice.index].append(choice.finish_reason)
    assert sorted(text) == [0, 1, 2]
    for choice in whole.choices:
        assert text[choice.index] == choice.text
        assert tokens[choice.index] == choice.logprobs.tokens
        assert finishes[choice.index] == [choice.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


async def test_n_choices_prefill_the_prompt_once(served: Served) -> None:
    """The other choices wait for the first one's prefill and start from its KV: each
    prefills one token. cached_tokens tells what the prompt (counted once) reused."""
    rt = served.rt
    prompt = " ".join(f"item{i}" for i in range(40))  # new to the cache, > 2 blocks
    length = len(await rt.tokenize("tiny", prompt))
    stats = rt.engine_statistics("tiny")
    assert stats is not None
    before = stats.prompt_tokens
    completion = await rt.complete("tiny", prompt, max_tokens=4, n=3, temperature=1.0)
    stats = rt.engine_statistics("tiny")
    assert stats is not None
    assert stats.prompt_tokens - before == length + 2
    assert completion.usage.prompt_tokens == length and completion.usage.cached_tokens == 0
    assert len(completion.choices) == 3
    again = await rt.complete("tiny", prompt, max_tokens=4, n=3, temperature=1.0)
    assert again.usage.cached_tokens == length - 1  # the first run's prompt, reused


async def test_jsonrpc_complete_and_generate_carry_every_choice(served: Served) -> None:
    rt = served.rt
    listener = JsonRpcListener(rt, "tcp://127.0.0.1:0")
    await rt.start_transport(listener.spec("jsonrpc"))
    client = await Client.connect(listener)
    params = {"prompt": PROMPT, "max_tokens": 8, "n": 2, "seed": 5, "temperature": 1.0}
    try:
        whole = await client.result("complete", params)
        started = await client.result("generate", params)
        chunks, end = await client.stream_end(started["stream_id"])
    finally:
        await client.aclose()
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert whole["text"] == whole["choices"][0]["text"]
    streamed: dict[int, list[int]] = defaultdict(list)
    for chunk in chunks:
        streamed[chunk.get("choice", 0)].extend(chunk["token_ids"])
    assert [streamed[0], streamed[1]] == [c["token_ids"] for c in whole["choices"]]
    assert end["params"]["finish_reasons"] == [c["finish_reason"] for c in whole["choices"]]
    assert end["params"]["usage"] == whole["usage"]


async def test_a_disconnect_cancels_every_choice(served: Served) -> None:
    rt = served.rt
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1000, "n": 3, "stream": True,
            "temperature": 1.0, "stop_token_ids": []}

    def read_a_little() -> None:
        with httpx.stream("POST", f"{served.base_url}/v1/completions", json=body,
                          timeout=10) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    return  # leave: the connection closes

    stats = rt.engine_statistics("tiny")
    assert stats is not None
    before = stats.generation_tokens
    await trio.to_thread.run_sync(read_a_little)
    await wait_until(lambda: _no_active(served))
    await wait_until(lambda: _engine_idle(rt))  # it applies the cancels between steps
    stats = rt.engine_statistics("tiny")
    assert stats is not None
    assert stats.generation_tokens - before < 3 * 1000  # cut short, all three

    def next_one(client: openai.OpenAI) -> int:
        return len(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                             n=2).choices)

    assert await served.sync(next_one) == 2


async def _no_active(served: Served) -> bool:
    return await registry_active(served.rt) == 0


def _engine_idle(rt: Runtime) -> bool:
    stats = rt.engine_statistics("tiny")
    return stats is not None and stats.active == 0 and stats.queued == 0


async def test_a_choice_refused_fails_the_request_and_ends_the_others(
        model_path: str) -> None:
    """Each choice takes a stream slot: n beyond the free slots is Overloaded, and the
    choices already admitted leave with it."""
    config = config_from_mapping({"stream_registry": {"max_active_streams": 2,
                                                      "max_queued": 0}})
    with trio.fail_after(60):
        async with open_runtime(config, models={"tiny": model_path}) as rt:
            with pytest.raises(CorralError) as caught:
                await rt.complete("tiny", PROMPT, max_tokens=8, n=3)
            assert caught.value.code is Code.OVERLOADED
            assert (await rt.registry_state()).active == 0
            completion = await rt.complete("tiny", PROMPT, max_tokens=8, n=2)
            assert len(completion.choices) == 2


async def test_a_token_stream_reads_one_choice(served: Served) -> None:
    with pytest.raises(CorralError) as caught:
        async with served.rt.generate("tiny", PROMPT, max_tokens=4, n=2):
            pass
    assert caught.value.code is Code.INVALID_PARAMS and "n:" in caught.value.message
    async with served.rt.generate_choices("tiny", PROMPT, max_tokens=4, n=2) as choices:
        ends = [(c.choice, c.finish_reason) async for c in choices if c.finish_reason]
    assert sorted(ends) == [(0, "length"), (1, "length")]


def test_a_real_corral_serve_answers_n_and_top_logprobs(model_path: str) -> None:
    """The whole path in `corral serve` as its users run it: 3 seeded choices with 5
    alternatives a token, streamed and whole, and refusals that leave it serving."""
    port = free_port()
    server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"])
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0)
        params: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8,
                                  "temperature": 1.0, "seed": 21, "n": 3, "logprobs": True,
                                  "top_logprobs": 5}
        whole = client.chat.completions.create(**params)
        again = client.chat.completions.create(**params)
        streamed: dict[int, list[str]] = defaultdict(list)
        for chunk in client.chat.completions.create(**params, stream=True):
            for choice in chunk.choices:
                if choice.logprobs is not None:
                    streamed[choice.index].extend(e.token for e in choice.logprobs.content or [])
        tokens = {c.index: [e.token for e in c.logprobs.content] for c in whole.choices}
        assert tokens == {c.index: [e.token for e in c.logprobs.content]
                          for c in again.choices} == dict(streamed)
        assert len({tuple(t) for t in tokens.values()}) > 1
        assert all(len(e.top_logprobs) == 5 for c in whole.choices for e in c.logprobs.content)
        for bad in ({"top_logprobs": 21}, {"n": 9}, {"n": 0}):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(**{**params, **bad})
            assert next(iter(bad)) in str(caught.value.message)
        assert len(client.chat.completions.create(**params).choices) == 3
    finally:
        server.stop()
