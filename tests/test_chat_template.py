"""A model's chat template replaced per model (`generation.models[].chat_template`, or
`load_model(chat_template=...)`), as text or as a file, under both isolations."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import config_from_mapping
from corral.protocol.errors import Code, EngineClientError
from corral.runtime import open_runtime

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
