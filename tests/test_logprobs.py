"""`top_logprobs` (chat) and completions `logprobs` (issue 14, item 3): the sampled
token's log-probability and its most likely alternatives, computed in the engine from
the row the sampler drew from, reported with real token strings in OpenAI's shapes,
streamed and whole, over HTTP (the official `openai` client), JSON-RPC and embedded.

Greedy decoding is deterministic and takes the most likely token, so under greedy the
first alternative is exactly the sampled token.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import openai
import pytest
import trio

from corral import aio, open_runtime
from corral.config import config_from_mapping
from corral.protocol.messages import Completion
from corral.server.jsonrpc import JsonRpcListener
from test_http import Served, served  # noqa: F401  (the fixture)
from test_jsonrpc_server import Client

pytestmark = pytest.mark.slow

PROMPT = "Please send the report by Friday so that"
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]


def _descending(values: list[float]) -> bool:
    return all(a >= b for a, b in itertools.pairwise(values))


def _spelt(tokens: list[str]) -> str:
    """The text the tokens spell, as mlx_lm's detokenizer writes it: without a space
    before the first token."""
    return "".join(tokens).removeprefix(" ")


async def _greedy(served: Served, max_tokens: int = 8) -> Completion:
    """The reference: the same request, embedded, with the token ids."""
    return await served.rt.complete("tiny", PROMPT, max_tokens=max_tokens, top_logprobs=5)


async def test_chat_top_logprobs_are_ordered_and_led_by_the_greedy_token(
        served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[Any, list[Any]]:
        whole = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
            top_logprobs=5)
        streamed = []
        for chunk in client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                logprobs=True, top_logprobs=5, stream=True):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                streamed.extend(chunk.choices[0].logprobs.content or [])
        return whole, streamed

    whole, streamed = await served.sync(run)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 8
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert _descending([alt.logprob for alt in entry.top_logprobs])
        best = entry.top_logprobs[0]
        assert (best.token, best.logprob) == (entry.token, entry.logprob)
        assert entry.logprob <= 0.0
        assert entry.bytes == list(entry.token.encode())
        assert all(alt.bytes == list(alt.token.encode()) for alt in entry.top_logprobs)
        assert not entry.token.startswith("token_id:")
    # Real strings: the tokens decoded one by one spell the answer (but for the space
    # that mlx_lm's streaming detokenizer drops before the first token).
    assert _spelt([e.token for e in content]) == whole.choices[0].message.content
    # Streaming reports the same, token for token.
    assert [(e.token, e.logprob, [(a.token, a.logprob) for a in e.top_logprobs])
            for e in streamed] == [
        (e.token, e.logprob, [(a.token, a.logprob) for a in e.top_logprobs]) for e in content]


async def test_chat_logprobs_without_alternatives_name_the_tokens(served: Served) -> None:
    def run(client: openai.OpenAI) -> Any:
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                              temperature=0, logprobs=True)

    reply = await served.sync(run)
    content = reply.choices[0].logprobs.content
    assert [entry.top_logprobs for entry in content] == [[]] * 6
    assert _spelt([e.token for e in content]) == reply.choices[0].message.content


async def test_completions_logprobs_report_tokens_offsets_and_alternatives(
        served: Served) -> None:
    reference = await _greedy(served)

    def run(client: openai.OpenAI) -> tuple[Any, list[Any]]:
        whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                          temperature=0, logprobs=5)
        chunks = [chunk.choices[0].logprobs for chunk in client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5,
            stream=True) if chunk.choices and chunk.choices[0].logprobs is not None]
        return whole, chunks

    whole, chunks = await served.sync(run)
    logprobs = whole.choices[0].logprobs
    assert reference.tokens is not None and reference.logprobs is not None
    assert logprobs.tokens == reference.tokens
    assert logprobs.token_logprobs == pytest.approx(reference.logprobs)
    assert _spelt(logprobs.tokens) == whole.choices[0].text == reference.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i]))
                                    for i in range(len(logprobs.tokens))]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                 logprobs.top_logprobs, strict=True):
        # Keyed by token string: two ids that decode alike would share one key.
        assert 1 <= len(top) <= 5
        assert _descending(list(top.values()))
        assert next(iter(top.items())) == (token, value)
    streamed_tokens = [t for chunk in chunks for t in chunk.tokens]
    assert streamed_tokens == logprobs.tokens
    assert [o for chunk in chunks for o in chunk.text_offset] == logprobs.text_offset
    assert [t for chunk in chunks for t in chunk.top_logprobs] == logprobs.top_logprobs

    def zero(client: openai.OpenAI) -> Any:
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                         temperature=0, logprobs=0)

    plain = (await served.sync(zero)).choices[0].logprobs
    assert plain.tokens == reference.tokens[:4] and plain.top_logprobs is None


async def test_embedded_and_jsonrpc_report_the_engines_alternatives(served: Served) -> None:
    rt = served.rt
    reference = await _greedy(served)
    assert reference.top_logprobs is not None and reference.tokens is not None
    for token, top in zip(reference.token_ids, reference.top_logprobs, strict=True):
        assert top[0].id == token  # greedy: the best alternative is the token taken
    decoded = [await rt.detokenize("tiny", [t]) for t in reference.token_ids]
    assert reference.tokens == decoded
    # Streamed embedded chunks carry the same per-token data.
    async with rt.generate("tiny", PROMPT, max_tokens=8, top_logprobs=5) as stream:
        tops = [top async for chunk in stream for top in chunk.top_logprobs or []]
    assert tops == reference.top_logprobs

    listener = JsonRpcListener(rt, "tcp://127.0.0.1:0")
    await rt.start_transport(listener.spec("jsonrpc"))
    client = await Client.connect(listener)
    try:
        params = {"prompt": PROMPT, "max_tokens": 8, "top_logprobs": 5}
        whole = await client.result("complete", params)
        started = await client.result("generate", params)
        chunks, end = await client.stream_end(started["stream_id"])
    finally:
        await client.aclose()
    assert whole["tokens"] == reference.tokens
    assert [[a["id"] for a in top] for top in whole["top_logprobs"]] == [
        [a.id for a in top] for top in reference.top_logprobs]
    assert [t for c in chunks for t in c["tokens"]] == reference.tokens
    assert [[a["token"] for a in top] for c in chunks for top in c["top_logprobs"]] == [
        [a.token for a in top] for top in reference.top_logprobs]
    assert end["method"] == "stream.end"


async def test_sampled_tokens_are_scored_from_the_distribution_they_were_drawn_from(
        served: Served) -> None:
    """At temperature 1 the token taken need not be the best; its log-probability is
    the one its alternatives list gives it whenever it is among them."""
    completion = await served.rt.complete("tiny", PROMPT, max_tokens=24, temperature=1.0,
                                          seed=11, top_logprobs=20)
    assert completion.top_logprobs is not None and completion.logprobs is not None
    seen = 0
    for token, value, top in zip(completion.token_ids, completion.logprobs,
                                 completion.top_logprobs, strict=True):
        assert len(top) == 20 and _descending([a.logprob for a in top])
        for alt in top:
            if alt.id == token:
                assert alt.logprob == pytest.approx(value)
                seen += 1
    assert seen > 0
    # A neighbour that asked for nothing is not slowed into reporting anything.
    plain = await served.rt.complete("tiny", PROMPT, max_tokens=4)
    assert plain.logprobs is None and plain.tokens is None and plain.top_logprobs is None


async def test_alternatives_cross_the_worker_process_boundary(model_path: str) -> None:
    config = config_from_mapping({"generation": {"isolation": "process"},
                                  "python_runtime": {"standby_worker": False}})
    with trio.fail_after(120):
        async with open_runtime(config, models={"tiny": model_path}) as rt:
            completion = await rt.complete("tiny", PROMPT, max_tokens=6, top_logprobs=3)
    assert completion.top_logprobs is not None and completion.tokens is not None
    assert [top[0].id for top in completion.top_logprobs] == completion.token_ids
    assert _spelt(completion.tokens) == completion.text


def test_asyncio_streams_and_completions_carry_the_alternatives(model_path: str) -> None:
    """Through `corral.aio`: a plain function with its own asyncio loop (pytest-trio
    leaves it alone)."""
    async def main() -> tuple[Completion, list[Any], list[Any]]:
        async with aio.open_runtime(models={"tiny": model_path}) as rt:
            whole = await rt.complete("tiny", PROMPT, max_tokens=6, top_logprobs=4, n=2)
            tops: list[Any] = []
            tokens: list[Any] = []
            async with rt.generate("tiny", PROMPT, max_tokens=6, top_logprobs=4) as stream:
                async for chunk in stream:
                    tops.extend(chunk.top_logprobs or [])
                    tokens.extend(chunk.tokens or [])
            return whole, tops, tokens

    whole, tops, tokens = asyncio.run(main())
    assert len(whole.choices) == 2 and whole.top_logprobs is not None
    assert tops == whole.top_logprobs and tokens == whole.tokens
    assert [top[0].id for top in tops] == whole.token_ids
