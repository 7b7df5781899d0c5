"""Completions' `echo`, `suffix` and batched prompts (issue 23 part 5), as the official
client sees them over the wire: a list of prompts (strings or token id lists) gives one
choice per prompt (`n` per prompt), ordered as OpenAI orders them; `echo` puts the
prompt's text before the completion's; `suffix`, `echo` with `logprobs`, a list mixing
strings and ids, and too large a batch are a 400 naming the field."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from test_http import Served, served  # noqa: F401  (the fixture)

PROMPTS = ["The quick brown fox", "Once upon a time"]


async def test_a_batch_of_prompts_gives_n_choices_per_prompt_in_order(served: Served) -> None:
    ids = [await served.rt.tokenize("tiny", p) for p in PROMPTS]

    def run(client: openai.OpenAI) -> tuple[Any, ...]:
        alone = [client.completions.create(model="tiny", prompt=p, max_tokens=5)
                 for p in PROMPTS]
        batch = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=5, n=2)
        by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5)
        streamed: dict[int, str] = {}
        finished: dict[int, str | None] = {}
        for chunk in client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=5,
                                               stream=True):
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + choice.text
                if choice.finish_reason is not None:
                    finished[choice.index] = choice.finish_reason
        return alone, batch, by_ids, streamed, finished

    alone, batch, by_ids, streamed, finished = await served.sync(run)
    texts = [reply.choices[0].text for reply in alone]
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    assert batch.usage.completion_tokens == 2 * sum(r.usage.completion_tokens for r in alone)
    assert [c.text for c in by_ids.choices] == texts
    assert streamed == {0: texts[0], 1: texts[1]}
    assert finished == {0: "length", 1: "length"}


async def test_echo_puts_the_prompt_before_the_completion(served: Served) -> None:
    ids = await served.rt.tokenize("tiny", PROMPTS[0], add_special_tokens=False)

    def run(client: openai.OpenAI) -> tuple[Any, ...]:
        plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4)
        echoed = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=4,
                                           echo=True)
        by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, echo=True)
        streamed = "".join(
            choice.text
            for chunk in client.completions.create(model="tiny", prompt=PROMPTS[0],
                                                   max_tokens=4, echo=True, stream=True)
            for choice in chunk.choices)
        return plain, echoed, by_ids, streamed

    plain, echoed, by_ids, streamed = await served.sync(run)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text
    assert echoed.choices[1].text.startswith(PROMPTS[1])
    assert by_ids.choices[0].text.startswith(PROMPTS[0])
    assert streamed == PROMPTS[0] + plain.choices[0].text
    assert echoed.usage.completion_tokens == 8


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"prompt": "Hi", "suffix": "end"}, "suffix", "fill-in-the-middle"),
    ({"prompt": "Hi", "echo": True, "logprobs": 1}, "echo", "log-probabilities"),
    ({"prompt": ["Hi", [1, 2]]}, "prompt", "either alone"),
    ({"prompt": ["Hi", 5]}, "prompt", "either alone"),
    ({"prompt": ["Hi"] * 9, "n": 2}, "prompt", "at most 16 sequences"),
])
async def test_what_completions_refuse_names_the_field(
        served: Served, body: dict[str, Any], field: str, says: str) -> None:
    reply = await served.post("/v1/completions", json={"model": "tiny", "max_tokens": 1,
                                                       **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and says in error["message"], error
