"""Reasoning apart from the answer (issue 23 part 5): for a model whose tokenizer
thinks, the text between its think markers is the chat reply's `reasoning_content`
(whole and streamed, as vLLM names it) and not its `content`; a prompt that ends inside
a think block (the template opened it) starts in the reasoning state, as mlx_lm.server
does; text completions keep the markers.

The model is the tiny one with `<think>` and `</think>` added (`thinking_model.py`),
made to write them where the tiny model's greedy reply has two chosen tokens. What the
client should see is read off the same model's raw text (a completion of the same
prompt ids, markers included), so no expectation depends on how the text decodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from corral.config import config_from_mapping
from corral.protocol.messages import ChatMessage, Thinking
from corral.runtime import Runtime, open_runtime
from corral.runtime.reasoning import ReasoningReader, starts_inside
from test_http import serve_http
from thinking_model import THINK_END, THINK_START, make_thinking_model

QUESTION = "Tell me about foxes."
MESSAGES = [{"role": "user", "content": QUESTION}]
MAX_TOKENS = 8
MARKERS = Thinking(THINK_START, THINK_END, [7], [8])


def test_the_reader_splits_reasoning_from_content_across_chunks() -> None:
    reader = ReasoningReader(MARKERS, inside=False)
    pieces = ["Hi <th", "ink>let me", " think</", "think> the answer", " is 4", "</thi"]
    read = [reader.feed(piece) for piece in pieces]
    content = "".join(c for c, _ in read)
    reasoning = "".join(r for _, r in read)
    rest, thought = reader.finish()
    assert (content + rest, reasoning + thought) == ("Hi  the answer is 4</thi",
                                                     "let me think")
    inside = ReasoningReader(MARKERS, inside=True)
    assert inside.feed("still thinking</think>done") == ("done", "still thinking")
    cut = ReasoningReader(MARKERS, inside=True)
    assert cut.feed("never ends <") == ("", "never ends ")
    assert cut.finish() == ("", "<")
    assert starts_inside(MARKERS, [1, 7, 2]) and not starts_inside(MARKERS, [1, 7, 8, 2])
    assert not starts_inside(MARKERS, [1, 2]) and starts_inside(MARKERS, [7, 8, 7])


@pytest.fixture
async def thinking(model_path: str, tmp_path: Path) -> Any:
    """A runtime serving `think` (the tiny model's template), `opened` (its template
    opens a think block when `enable_thinking`, as Qwen 3's does) and `tiny` itself."""
    async with open_runtime(config_from_mapping({}), models={"tiny": model_path}) as rt:
        plain = await rt.complete("tiny", messages=MESSAGES, max_tokens=MAX_TOKENS)
    first, fifth = plain.token_ids[0], plain.token_ids[4]
    assert plain.token_ids.count(first) == plain.token_ids.count(fifth) == 1, plain.token_ids
    path = make_thinking_model(model_path, tmp_path / "thinking", start_like=first,
                               end_like=fifth)
    template = json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    opened = template + "{% if add_generation_prompt and enable_thinking %}<think>{% endif %}"
    config = config_from_mapping({"generation": {"models": [
        {"alias": "think", "path": str(path)},
        {"alias": "opened", "path": str(path), "chat_template": opened},
        {"alias": "tiny", "path": model_path}]}})
    async with open_runtime(config) as rt:
        served = await serve_http(rt)
        yield rt, served
        served.metrics.close()


async def _raw(rt: Runtime, alias: str, prompt_alias: str) -> str:
    """The model's raw text (markers kept) for the chat prompt `prompt_alias` renders."""
    ids = await rt.tokenize_chat(prompt_alias, [ChatMessage(role="user", content=QUESTION)])
    return (await rt.complete(alias, ids, max_tokens=MAX_TOKENS)).text


def _split(raw: str, *, inside: bool) -> tuple[str, str]:
    """(content, reasoning) of raw text, by its markers."""
    before, rest = ("", raw) if inside else raw.split(THINK_START, 1)
    thought, after = rest.split(THINK_END, 1)
    return before + after, thought


async def test_reasoning_is_apart_from_content_whole_streamed_and_embedded(
        thinking: Any) -> None:
    rt, served = thinking
    raw = await _raw(rt, "think", "think")
    assert THINK_START in raw and THINK_END in raw
    content, reasoning = _split(raw, inside=False)
    assert content and reasoning

    embedded = await rt.complete("think", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert (embedded.text, embedded.reasoning) == (content, reasoning)
    # Left together (as the Anthropic, Ollama and Responses APIs ask): the raw text.
    kept = await rt.complete("think", messages=MESSAGES, max_tokens=MAX_TOKENS,
                             separate_reasoning=False)
    assert (kept.text, kept.reasoning) == (raw, None)

    def over_http(client: openai.OpenAI) -> tuple[Any, ...]:
        whole = client.chat.completions.create(model="think", messages=MESSAGES,
                                               max_tokens=MAX_TOKENS)
        parts: dict[str, str] = {"content": "", "reasoning_content": ""}
        for chunk in client.chat.completions.create(model="think", messages=MESSAGES,
                                                    max_tokens=MAX_TOKENS, stream=True):
            for choice in chunk.choices:
                delta = choice.delta.model_dump()
                for key in parts:
                    parts[key] += delta.get(key) or ""
        text = client.completions.create(model="think", prompt=QUESTION, max_tokens=1)
        plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        return whole.choices[0].message.model_dump(), parts, text, plain.choices[0].message

    message, parts, _, plain = await served.sync(over_http)
    assert (message["content"], message["reasoning_content"]) == (content, reasoning)
    assert parts == {"content": content, "reasoning_content": reasoning}
    assert plain.model_dump().get("reasoning_content") is None


async def test_a_prompt_that_opens_a_think_block_starts_in_reasoning(thinking: Any) -> None:
    rt, served = thinking
    opened = _split(await _raw(rt, "opened", "opened"), inside=True)
    # With enable_thinking off the template leaves the block closed, as the model's
    # own template renders it.
    closed_raw = await _raw(rt, "opened", "think")
    closed = _split(closed_raw, inside=False)

    def over_http(client: openai.OpenAI) -> list[tuple[Any, Any]]:
        replies = []
        for extra in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
            reply = client.chat.completions.create(model="opened", messages=MESSAGES,
                                                   max_tokens=MAX_TOKENS, extra_body=extra)
            message = reply.choices[0].message.model_dump()
            replies.append((message["content"], message["reasoning_content"]))
        return replies

    assert await served.sync(over_http) == [opened, closed]
    # Text completions keep the markers: the prompt is the client's own.
    text = await rt.complete("opened", QUESTION, max_tokens=MAX_TOKENS)
    assert text.reasoning is None
