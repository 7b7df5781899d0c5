"""A model's chat template replaced per model (`generation.models[].chat_template`, or
`load_model(chat_template=...)`), as text or as a file, under both isolations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from corral.config import config_from_mapping
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import MAX_TEMPLATE_KWARGS, MAX_TEMPLATE_KWARGS_BYTES
from corral.runtime import open_runtime
from corral.server.jsonrpc import JsonRpcListener
from test_http import serve_http
from test_jsonrpc_server import Client

TEMPLATE = ("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>>{% endif %}")
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_replaced_template_renders_the_prompt(
        model_path: str, tmp_path: Path, isolation: str) -> None:
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(TEMPLATE)
    config = config_from_mapping({"generation": {"isolation": isolation, "models": [
        {"alias": "own", "path": model_path},
        {"alias": "text", "path": model_path, "chat_template": TEMPLATE},
        {"alias": "file", "path": model_path, "chat_template": str(template_file)}]}})
    async with open_runtime(config) as rt:
        expected = await rt.tokenize("text", "<<user>>Hello there\n<<assistant>>",
                                     add_special_tokens=False)
        own = await rt.complete("own", messages=MESSAGES, max_tokens=1)
        for alias in ("text", "file"):
            reply = await rt.complete(alias, messages=MESSAGES, max_tokens=1)
            assert reply.usage.prompt_tokens == len(expected)
            assert reply.usage.prompt_tokens != own.usage.prompt_tokens


async def test_a_template_that_does_not_render_is_a_client_error_and_the_model_serves_on(
        model_path: str) -> None:
    async with open_runtime(config_from_mapping({})) as rt:
        await rt.load_model(model_path, alias="broken",
                            chat_template="{{ raise_exception('no chat here') }}")
        with pytest.raises(EngineClientError) as caught:
            await rt.complete("broken", messages=MESSAGES, max_tokens=1)
        assert caught.value.code is Code.TOKENIZER_ERROR
        assert "no chat here" in caught.value.message
        reply = await rt.complete("broken", prompt="Hello", max_tokens=2)
        assert reply.usage.completion_tokens == 2


# -- chat_template_kwargs: the request's variables for the template (issue 23 part 5) ------

GREETING_TEMPLATE = ("{% if greeting %}<<{{ greeting }}>>{% endif %}"
                     "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<<assistant>>{% endif %}")
LONG_GREETING = "good morning to everyone reading this"


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_chat_template_kwargs_reach_the_template_everywhere(
        model_path: str, isolation: str) -> None:
    config = config_from_mapping({"generation": {"isolation": isolation, "models": [
        {"alias": "greet", "path": model_path, "chat_template": GREETING_TEMPLATE}]}})
    async with open_runtime(config) as rt:
        plain = await rt.complete("greet", messages=MESSAGES, max_tokens=1)
        greeted = await rt.complete("greet", messages=MESSAGES, max_tokens=1,
                                    chat_template_kwargs={"greeting": LONG_GREETING})
        expected = await rt.tokenize(
            "greet", f"<<{LONG_GREETING}>><<user>>Hello there\n<<assistant>>",
            add_special_tokens=False)
        assert greeted.usage.prompt_tokens == len(expected) > plain.usage.prompt_tokens

        served = await serve_http(rt)
        try:
            def over_http(client: openai.OpenAI) -> tuple[int, int]:
                counts = []
                for extra in ({}, {"chat_template_kwargs": {"greeting": LONG_GREETING}}):
                    reply = client.chat.completions.create(
                        model="greet", messages=[{"role": "user", "content": "Hello there"}],
                        max_tokens=1, extra_body=extra)
                    assert reply.usage is not None
                    counts.append(reply.usage.prompt_tokens)
                return counts[0], counts[1]

            assert await served.sync(over_http) == (plain.usage.prompt_tokens,
                                                    greeted.usage.prompt_tokens)
        finally:
            served.metrics.close()

        listener = JsonRpcListener(rt, "tcp://127.0.0.1:0")
        await rt.start_transport(listener.spec("jsonrpc"))
        client = await Client.connect(listener)
        result = await client.result("complete", {
            "model": "greet", "messages": MESSAGES, "max_tokens": 1,
            "chat_template_kwargs": {"greeting": LONG_GREETING}})
        assert result["usage"]["prompt_tokens"] == greeted.usage.prompt_tokens
        refused = await client.call("complete", {
            "model": "greet", "messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}})
        assert refused["error"]["data"]["field"] == "chat_template_kwargs.tokenize"
        await client.aclose()


async def test_chat_template_kwargs_are_bounded(model_path: str) -> None:
    async with open_runtime(config_from_mapping({}), models={"tiny": model_path}) as rt:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"not an identifier": 1}, "chat_template_kwargs"),
            ({f"k{i}": i for i in range(MAX_TEMPLATE_KWARGS + 1)}, "chat_template_kwargs"),
            ({"big": "x" * MAX_TEMPLATE_KWARGS_BYTES}, "chat_template_kwargs"),
            ({"value": object()}, "chat_template_kwargs"),
            ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt"),
        ]
        for kwargs, field in cases:
            with pytest.raises(EngineClientError) as caught:
                await rt.complete("tiny", messages=MESSAGES, max_tokens=1,
                                  chat_template_kwargs=kwargs)
            assert caught.value.code is Code.INVALID_PARAMS, kwargs
            assert field in caught.value.message, kwargs
        with pytest.raises(EngineClientError) as caught:
            await rt.complete("tiny", "Hello", max_tokens=1,
                              chat_template_kwargs={"greeting": "hi"})
        assert caught.value.details["field"] == "chat_template_kwargs"
        with pytest.raises(openai.BadRequestError) as refused:
            served = await serve_http(rt)
            try:
                await served.sync(lambda client: client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Hi"}],
                    extra_body={"chat_template_kwargs": {"x": "y" * MAX_TEMPLATE_KWARGS_BYTES}}))
            finally:
                served.metrics.close()
        assert "chat_template_kwargs" in str(refused.value)
