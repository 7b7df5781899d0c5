"""`generated`: a generation another server lost continues here as after a worker
restart (issue 16: the cross-replica resume of deterministic streams).

The tiny model, embedded: for greedy, seeded, penalised and grammar-constrained
requests, the continuation of the first k tokens is exactly the rest of the
uninterrupted run, tokens and text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.config import config_from_mapping
from corral.protocol.errors import Code, EngineClientError
from corral.runtime import Runtime, open_runtime

pytestmark = pytest.mark.slow

SCHEMA = {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["name", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 30},
                   "tags": {"type": "array", "maxItems": 4,
                            "items": {"type": "string", "maxLength": 8}}}}}}


@pytest.fixture
async def rt(model_path: str) -> AsyncIterator[Runtime]:
    async with open_runtime(config_from_mapping({}), models={"tiny": model_path}) as runtime:
        yield runtime


@pytest.mark.parametrize("params", [
    {"temperature": 0.0},
    {"temperature": 1.0, "seed": 7},
    {"temperature": 0.8, "seed": 3, "top_p": 0.9, "presence_penalty": 1.0},
    {"temperature": 1.0, "seed": 11, "response_format": SCHEMA},
], ids=["greedy", "seeded", "penalised", "grammar"])
@pytest.mark.parametrize("cut", [1, 9])
async def test_a_continuation_is_the_rest_of_the_uninterrupted_run(
        rt: Runtime, params: dict[str, Any], cut: int) -> None:
    prompt = await rt.tokenize("tiny", "The river runs through the valley")
    whole = await rt.complete("tiny", prompt, max_tokens=40, **params)
    assert len(whole.token_ids) > cut
    sent = whole.token_ids[:cut]
    rest = await rt.complete("tiny", prompt, max_tokens=40, generated=sent, **params)
    assert rest.token_ids == whole.token_ids[cut:]
    assert await rt.detokenize("tiny", sent) + rest.text == whole.text
    assert rest.finish_reason == whole.finish_reason
    assert rest.usage.prompt_tokens == len(prompt)
    assert rest.usage.completion_tokens == len(whole.token_ids) - cut


async def test_bad_continuations_are_400_naming_the_field(rt: Runtime) -> None:
    cases: list[dict[str, Any]] = [
        {"prompt": "Hi", "generated": [5, 6], "max_tokens": 2},
        {"messages": [{"role": "user", "content": "Hi"}], "generated": [5]},
        {"prompt": "Hi", "generated": [10**6]},
        {"prompt": "Hi", "generated": [5], "n": 2},
    ]
    for case in cases:
        with pytest.raises(EngineClientError) as refused:
            await rt.complete("tiny", **case)
        assert refused.value.code is Code.INVALID_PARAMS
        assert refused.value.details["field"] == "generated", refused.value
        assert (await rt.complete("tiny", "Hi", max_tokens=2)).finish_reason in ("stop",
                                                                                 "length")
