"""SmolLM2-135M-Instruct, a real model, through `corral serve` and the official `openai`
client: a 1,000-token system prompt answered under the default config (and its request
deadline) in both isolations with no stall, the next turn from the prefix cache with the
same greedy text, kill -9 of the worker mid-stream with the text unchanged, and
structured output and a forced tool call that validate.

One server per isolation for the whole module: loading and the long prefills are the
cost here (minutes on a 2-core CPU), so each is paid once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.test_serve import Server, free_port

pytestmark = pytest.mark.slow

TOOLS_TEMPLATE = Path(__file__).parent.parent / "examples" / "chatml-tools.jinja"
_FILLER = ("The museum keeps a careful record of every object in its collection: where it "
           "was found, who gave it, how old it is and which room shows it. ")


def _system_prompt() -> str:
    """About 1,000 tokens of SmolLM2's tokenizer: notes, then the instruction."""
    notes = [f"Note {i}: {_FILLER}" for i in range(32)]
    return ("You are the museum's assistant. " + " ".join(notes)
            + " Answer the visitor's question in one short sentence.")


class Served:
    def __init__(self, server: Server, port: int) -> None:
        self.server = server
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="x", max_retries=0,
                                    timeout=900)

    def worker_pid(self) -> int:
        health = httpx.get(f"{self.base}/health", timeout=30).json()
        [model] = health["models"]
        return int(model["worker_pid"])


def _serve(gguf: Path, cache: Path, tmp_path: Path, isolation: str | None) -> Iterator[Served]:
    port = free_port()
    config = None
    if isolation is not None:  # else the default config: no file at all
        config = tmp_path / f"{isolation}.yaml"
        config.write_text(f"generation:\n  isolation: {isolation}\n")
    server = Server(["--model", f"smollm2={gguf}", "--http", f"127.0.0.1:{port}"], config,
                    env={"CORRAL_CACHE_DIR": str(cache)})
    try:
        server.wait_ready()
        yield Served(server, port)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def default(smollm2_gguf: Path, smollm2_cache: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(smollm2_gguf, smollm2_cache, tmp_path_factory.mktemp("default"), None)


@pytest.fixture(scope="module")
def process(smollm2_gguf: Path, smollm2_cache: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(smollm2_gguf, smollm2_cache, tmp_path_factory.mktemp("process"),
                      "process")


def _long_chat(served: Served) -> Any:
    return served.client.chat.completions.create(
        model="smollm2", max_tokens=16, temperature=0,
        messages=[{"role": "system", "content": _system_prompt()},
                  {"role": "user", "content": "What does the museum keep a record of?"}])


@pytest.mark.parametrize("isolation", ["default", "process"])
def test_a_1000_token_system_prompt_is_answered_and_the_next_turn_hits_the_cache(
        request: pytest.FixtureRequest, isolation: str) -> None:
    served: Served = request.getfixturevalue(isolation)
    first = _long_chat(served)
    assert first.usage is not None and first.usage.prompt_tokens >= 1000
    assert first.choices[0].message.content
    again = _long_chat(served)
    assert again.choices[0].message.content == first.choices[0].message.content
    details = again.usage.prompt_tokens_details if again.usage is not None else None
    assert details is not None and (details.cached_tokens or 0) >= 960
    assert not [line for line in served.server.lines if "engine_stalled" in line]


def test_kill_9_of_the_worker_mid_stream_leaves_the_text_unchanged(process: Served) -> None:
    messages = [{"role": "user", "content": "Tell me about the city of Paris."}]
    fault_free = process.client.chat.completions.create(
        model="smollm2", max_tokens=24, temperature=0, messages=messages)
    text, killed = "", 0
    for chunk in process.client.chat.completions.create(
            model="smollm2", max_tokens=24, temperature=0, messages=messages, stream=True):
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if len(text) >= 12 and not killed:
            killed = process.worker_pid()
            os.kill(killed, signal.SIGKILL)
    assert killed
    assert text == fault_free.choices[0].message.content
    deadline = time.monotonic() + 120
    while process.worker_pid() == killed and time.monotonic() < deadline:
        time.sleep(0.2)
    again = process.client.chat.completions.create(
        model="smollm2", max_tokens=24, temperature=0, messages=messages)
    assert again.choices[0].message.content == fault_free.choices[0].message.content


def test_json_schema_output_validates(default: Served) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string", "maxLength": 24},
                             "country": {"type": "string", "maxLength": 24}}}
    reply = default.client.chat.completions.create(
        model="smollm2", max_tokens=48, temperature=0,
        messages=[{"role": "user", "content": "Name the capital of France and its country."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "capital", "schema": schema, "strict": True}})
    content = reply.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), schema)


def test_a_required_tool_call_parses_and_validates_with_a_tools_template(
        smollm2_gguf: Path, smollm2_cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "tools.yaml"
    config.write_text("generation:\n  models:\n"
                      f"    - {{alias: smollm2, path: '{smollm2_gguf}', "
                      f"chat_template: '{TOOLS_TEMPLATE}'}}\n")
    port = free_port()
    server = Server(["--http", f"127.0.0.1:{port}"], config,
                    env={"CORRAL_CACHE_DIR": str(smollm2_cache)})
    parameters = {"type": "object", "additionalProperties": False, "required": ["city"],
                  "properties": {"city": {"type": "string", "maxLength": 24}}}
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=900)
        reply = client.chat.completions.create(
            model="smollm2", max_tokens=48, temperature=0, tool_choice="required",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[{"type": "function", "function": {
                "name": "get_weather", "description": "The weather in a city",
                "parameters": parameters}}])
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls or []
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), parameters)
    finally:
        server.stop()
