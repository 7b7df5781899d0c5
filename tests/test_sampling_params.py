"""presence_penalty, frequency_penalty and logit_bias (issue 14, item 3): applied inside
the batch through mlx_lm's logits processors, over HTTP with the official `openai`
client and embedded; these and the other sampling fields (logprobs, top_logprobs, n)
refused with a 400 naming the field when out of range.

Greedy decoding is deterministic, so each parameter's effect is checked exactly.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from test_http import Served, served  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"  # greedy repeats itself on it


def _repeats(ids: list[int], window: int = 20) -> int:
    """Tokens that already appeared among the `window` tokens before them."""
    return sum(1 for i, token in enumerate(ids) if token in ids[max(0, i - window):i])


async def test_a_logit_bias_of_minus_100_removes_the_greedy_token(served: Served) -> None:
    rt = served.rt
    plain = await rt.complete("tiny", PROMPT, max_tokens=8)
    first = plain.token_ids[0]
    banned = await rt.complete("tiny", PROMPT, max_tokens=8, logit_bias={first: -100.0})
    assert banned.token_ids[0] != first and first not in banned.token_ids

    def over_http(client: openai.OpenAI) -> tuple[str, str]:
        kept = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                         temperature=0)
        biased = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                           temperature=0, logit_bias={str(first): -100})
        return kept.choices[0].text, biased.choices[0].text

    kept, biased = await served.sync(over_http)
    assert kept == plain.text and biased == banned.text
    # A positive bias makes a token the greedy choice.
    forced = await rt.complete("tiny", PROMPT, max_tokens=4, logit_bias={first + 1: 100.0})
    assert forced.token_ids == [first + 1] * 4


async def test_presence_and_frequency_penalties_stop_tokens_repeating(served: Served) -> None:
    rt = served.rt
    plain = await rt.complete("tiny", PROMPT, max_tokens=40)
    presence = await rt.complete("tiny", PROMPT, max_tokens=40, presence_penalty=2.0)
    frequency = await rt.complete("tiny", PROMPT, max_tokens=40, frequency_penalty=2.0)
    assert _repeats(plain.token_ids) > 10
    assert _repeats(presence.token_ids) < _repeats(plain.token_ids) / 2
    assert _repeats(frequency.token_ids) < _repeats(plain.token_ids) / 2

    def over_http(client: openai.OpenAI) -> str:
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
            temperature=0, presence_penalty=1.5, frequency_penalty=0.5)
        return chat.choices[0].message.content or ""

    assert await served.sync(over_http)  # accepted, not refused as before


@pytest.mark.parametrize(("api", "body", "field"), [
    ("completions", {"presence_penalty": 3.0}, "presence_penalty"),
    ("completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 101.0}}, "logit_bias"),
    ("completions", {"logit_bias": {"99999999": 1.0}}, "logit_bias"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs, as OpenAI refuses
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 9}, "n"),
])
async def test_out_of_range_values_are_400_naming_the_field(
        served: Served, api: str, body: dict[str, Any], field: str) -> None:
    def run(client: openai.OpenAI) -> tuple[openai.APIStatusError, str]:
        with pytest.raises(openai.APIStatusError) as caught:
            if api == "chat":
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=4, extra_body=body)
            else:
                client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                          extra_body=body)
        after = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
        return caught.value, after.choices[0].finish_reason

    error, next_finish = await served.sync(run)
    assert error.status_code == 400
    assert field in str(error.message)
    assert next_finish == "length"  # the next request is served
