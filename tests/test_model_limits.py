"""Prompt and max_tokens limits: the serving model's context decides, the config may
lower them, and a refusal names the limit and the key that changes it (issue 12, item 4;
issue 14, item 4).

Real tiny models (of 2k and 128k context) in real time; prompts are token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import Code, EngineClientError
from corral.runtime import Runtime, open_runtime
from corral.tiny import make_tiny_model

pytestmark = pytest.mark.slow


def _config(**generation: Any) -> RuntimeConfig:
    return config_from_mapping({"generation": generation})


def _prompt(rt: Runtime, tokens: int) -> list[int]:
    """`tokens` token ids the model knows, none of them special."""
    info = rt.list_models()[0].info
    assert info is not None
    return [5 + i % (info.vocab_size - 10) for i in range(tokens)]


async def _refused(rt: Runtime, **params: Any) -> EngineClientError:
    with pytest.raises(EngineClientError) as caught:
        await rt.complete("tiny", **params)
    assert caught.value.code is Code.INVALID_PARAMS
    return caught.value


async def _served(rt: Runtime) -> None:
    completion = await rt.complete("tiny", "The quick brown fox", max_tokens=4)
    assert completion.finish_reason in ("length", "stop")


async def test_a_128k_context_model_takes_a_5k_prompt_by_default(tmp_path: Path) -> None:
    long_context = str(make_tiny_model(tmp_path / "long", context=131072))
    async with open_runtime(_config(), models={"tiny": long_context}) as rt:
        info = rt.list_models()[0].info
        assert info is not None and info.max_context == 131072
        with trio.fail_after(120):
            completion = await rt.complete("tiny", _prompt(rt, 5000), max_tokens=4)
            assert completion.usage.prompt_tokens == 5000
            assert completion.finish_reason in ("length", "stop")
            # So does a max_tokens past 4096, up to what the context leaves.
            async with rt.generate("tiny", _prompt(rt, 5), max_tokens=8000) as stream:
                async for _ in stream:
                    break
            refused = await _refused(rt, prompt=_prompt(rt, 5), max_tokens=131068)
            assert refused.message == ("max_tokens: 131068, but the prompt's 5 tokens "
                                       "leave 131067 of the model context of 131072")
            await _served(rt)


async def test_a_prompt_over_the_models_context_names_it_and_the_key(model_path: str) -> None:
    async with open_runtime(_config(), models={"tiny": model_path}) as rt:
        with trio.fail_after(60):
            for tokens in (3002, 2048):
                refused = await _refused(rt, prompt=_prompt(rt, tokens), max_tokens=1)
                assert refused.message.startswith(
                    f"prompt: {tokens} tokens, model context is 2048")
                assert refused.details["limit"] == 2047
                await _served(rt)
            # The whole context but one token is a prompt the model takes, without a
            # max_tokens (it gets the one the context leaves), not with more.
            completion = await rt.complete("tiny", _prompt(rt, 2047))
            assert completion.usage.prompt_tokens == 2047
            assert len(completion.token_ids) == 1
            refused = await _refused(rt, prompt=_prompt(rt, 2047), max_tokens=4)
            assert refused.details == {"field": "max_tokens", "limit": 1,
                                       "prompt_tokens": 2047, "context": 2048}
            await _served(rt)


async def test_a_configured_prompt_limit_never_raises_the_context(model_path: str) -> None:
    async with open_runtime(_config(max_prompt_tokens=100_000),
                            models={"tiny": model_path}) as rt:
        with trio.fail_after(60):
            refused = await _refused(rt, prompt=_prompt(rt, 3002), max_tokens=1)
            assert refused.message.startswith("prompt: 3002 tokens, model context is 2048")
            await _served(rt)


async def test_a_configured_prompt_limit_wins_and_is_named(model_path: str) -> None:
    async with open_runtime(_config(max_prompt_tokens=1000),
                            models={"tiny": model_path}) as rt:
        with trio.fail_after(60):
            refused = await _refused(rt, prompt=_prompt(rt, 1001), max_tokens=4)
            assert refused.message == (
                "prompt: 1001 tokens, over generation.max_prompt_tokens (1000)")
            completion = await rt.complete("tiny", _prompt(rt, 1000), max_tokens=4)
            assert completion.usage.prompt_tokens == 1000
            await _served(rt)


async def test_a_configured_max_tokens_limit_wins_and_is_named(model_path: str) -> None:
    async with open_runtime(_config(max_tokens_limit=100, default_max_tokens=16),
                            models={"tiny": model_path}) as rt:
        with trio.fail_after(60):
            refused = await _refused(rt, prompt="The quick brown fox", max_tokens=101)
            assert refused.message == "max_tokens: 101, over generation.max_tokens_limit (100)"
            assert refused.details == {"field": "max_tokens", "limit": 100}
            await _served(rt)


async def test_max_tokens_must_fit_the_context_and_absent_takes_what_is_left(
        model_path: str) -> None:
    async with open_runtime(_config(default_max_tokens=None), models={"tiny": model_path}) as rt:
        with trio.fail_after(60):
            refused = await _refused(rt, prompt=_prompt(rt, 2000), max_tokens=4000)
            assert refused.message == ("max_tokens: 4000, but the prompt's 2000 tokens "
                                       "leave 48 of the model context of 2048")
            await _served(rt)
            completion = await rt.complete("tiny", _prompt(rt, 2000), max_tokens=48)
            assert len(completion.token_ids) <= 48
            # Absent, with no configured cap: what the context leaves.
            completion = await rt.complete("tiny", _prompt(rt, 2040))
            assert len(completion.token_ids) <= 8
            assert completion.finish_reason == "length" or len(completion.token_ids) < 8


async def test_absent_max_tokens_is_capped_by_the_configured_default(model_path: str) -> None:
    async with open_runtime(_config(default_max_tokens=3), models={"tiny": model_path}) as rt:
        with trio.fail_after(60):
            completion = await rt.complete("tiny", _prompt(rt, 10))
            assert len(completion.token_ids) <= 3


async def test_over_context_over_http_is_400_and_the_next_request_works(
        model_path: str) -> None:
    import openai

    from test_http import serve_http

    async with open_runtime(_config(), models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        long_prompt = _prompt(rt, 3002)

        def run(client: openai.OpenAI) -> tuple[Any, Any, Any]:
            with pytest.raises(openai.BadRequestError) as prompt_refused:
                client.completions.create(model="tiny", prompt=long_prompt, max_tokens=1)
            with pytest.raises(openai.BadRequestError) as max_tokens_refused:
                client.completions.create(model="tiny", prompt="The quick brown fox",
                                          max_tokens=4000)
            return (prompt_refused.value, max_tokens_refused.value,
                    client.completions.create(model="tiny", prompt="The quick brown fox",
                                              max_tokens=4))

        prompt_refused, max_tokens_refused, served_next = await served.sync(run)
        assert prompt_refused.message.startswith(
            "Error code: 400 - prompt: 3002 tokens, model context is 2048")
        assert isinstance(max_tokens_refused.body, dict)
        assert max_tokens_refused.body["param"] == "max_tokens"
        assert served_next.choices[0].finish_reason in ("stop", "length")
        served.metrics.close()
