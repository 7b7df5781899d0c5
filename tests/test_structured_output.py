"""Structured output (issue 14, item 2): `response_format` enforced by llguidance's token
mask inside the batch, over HTTP with the official `openai` client, over JSON-RPC and
embedded.

The tiny model has random weights, so whatever it writes is the grammar's doing. Its
schema keeps every string and number bounded, so a sampled object always closes well
within max_tokens (see the README: a grammar that allows unbounded output can still run
into max_tokens).
"""

# ruff: noqa: F811  (tests take the imported `served` fixture as a parameter)
from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
import trio

from corral.config import config_from_mapping
from corral.engine.base import validate_sequence
from corral.engine.grammar import (
    GRAMMAR_CACHE_SIZE,
    check_grammar,
    compile_problem,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    response_format_grammar,
)
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.grammar import JsonSchema, JsonSchemaFormat, TextFormat
from corral.protocol.messages import EngineStep, SamplingParams
from corral.runtime import open_runtime
from test_engine import Recorder, open_engine, seq
from test_http import Served, served  # noqa: F401  (the fixture, which tests name)
from test_isolation import PROMPT as PROCESS_PROMPT
from test_isolation import stream_with_kill
from test_jsonrpc_server import Client
from test_jsonrpc_server import serve as serve_jsonrpc
from test_serve import serve_process

pytestmark = pytest.mark.slow

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "ok", "count", "color"],
    "additionalProperties": False,
}
RECORD = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA,
                                                 "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a record as JSON."}]
MAX_TOKENS = 96  # a record takes about 40 tokens of the tiny model


def _valid(text: str) -> dict[str, Any]:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    assert isinstance(value, dict)
    return value


def test_json_schema_output_always_validates_20_seeded_requests_streaming_and_not(
        model_path: str) -> None:
    """A real `corral serve` process, driven by the official client."""
    with serve_process(model_path) as client:
        results = _seeded_records(client)
        completion = client.completions.create(
            model="tiny", prompt="A record:", max_tokens=MAX_TOKENS, temperature=0.8,
            seed=3, extra_body={"response_format": RECORD})
    for text, finish, streamed, streamed_finish in results:
        assert finish == "stop" and streamed_finish == "stop"
        _valid(text)
        assert streamed == text  # the same seed samples the same tokens either way
    assert len({text for text, *_ in results}) > 10  # sampling varied; the grammar held
    assert completion.choices[0].finish_reason == "stop"
    _valid(completion.choices[0].text)


def _seeded_records(client: openai.OpenAI) -> list[tuple[str, str, str, str]]:
    """(text, finish, streamed text, streamed finish) of 20 seeded record requests."""
    results = []
    for seed in range(20):
        request: dict[str, Any] = {
            "model": "tiny", "messages": MESSAGES, "response_format": RECORD,
            "temperature": 1.0, "seed": seed, "max_tokens": MAX_TOKENS}
        whole = client.chat.completions.create(**request)
        streamed, finish = "", ""
        for chunk in client.chat.completions.create(**request, stream=True):
            for choice in chunk.choices:
                streamed += choice.delta.content or ""
                finish = choice.finish_reason or finish
        results.append((whole.choices[0].message.content or "",
                        whole.choices[0].finish_reason, streamed, finish))
    return results


async def test_json_object_output_parses_whenever_it_ends(served: Served) -> None:
    # The random model seldom closes an object on its own within max_tokens; a bias
    # towards "}" on some requests makes sure the closing path (EOS once the object is
    # complete) is taken, whatever the weights.
    [close] = await served.rt.tokenize("tiny", "}", add_special_tokens=False)

    def run(client: openai.OpenAI) -> list[tuple[str, str]]:
        replies = [client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Give me a JSON object."}],
            response_format={"type": "json_object"}, temperature=1.0, seed=seed,
            max_tokens=128, logit_bias={str(close): 5.0 * (seed % 4)})
            for seed in range(16)]
        return [(r.choices[0].message.content or "", r.choices[0].finish_reason)
                for r in replies]

    results = await served.sync(run)
    ended = [text for text, finish in results if finish == "stop"]
    assert len(ended) >= 4, "the objects biased towards closing closed"
    for text in ended:
        assert isinstance(json.loads(text), dict)
    for text, finish in results:  # cut by max_tokens: still a JSON object's beginning
        assert text.startswith("{") and finish in ("stop", "length")


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "strin"}, "Invalid type: strin"),
    ({"type": "string", "pattern": "(("}, "unclosed group"),
    ({"$ref": "#/definitions/missing"}, "/definitions/missing"),
])
async def test_an_uncompilable_schema_is_400_guidance_error_and_the_next_request_works(
        served: Served, schema: dict[str, Any], problem: str) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}

    def run(client: openai.OpenAI) -> tuple[list[openai.APIStatusError], str]:
        errors = []
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model="tiny", messages=MESSAGES,
                                               response_format=bad, stream=stream)
            errors.append(caught.value)
        after = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                               response_format=RECORD, max_tokens=MAX_TOKENS)
        return errors, after.choices[0].message.content or ""

    errors, after = await served.sync(run)
    for error in errors:
        assert error.status_code == 400
        assert error.code == "GuidanceError"
        assert problem in error.message and "response_format" in error.message
    _valid(after)


async def test_an_unknown_response_format_type_is_400_invalid_params(served: Served) -> None:
    def run(client: openai.OpenAI) -> tuple[openai.APIStatusError, str]:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="tiny", messages=MESSAGES,
                                           response_format={"type": "xml"})  # type: ignore[typeddict-item]
        after = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        return caught.value, after.choices[0].finish_reason

    error, finish = await served.sync(run)
    assert error.status_code == 400 and error.code == "InvalidParams"
    assert "response_format.type" in error.message
    assert finish == "length"


async def test_one_constrained_request_leaves_its_7_neighbours_greedy_text_unchanged(
        model_path: str) -> None:
    prompts = ["The quick brown fox", "Once upon a time", "In the beginning",
               "Please send the report", "My favourite colour is", "The train left",
               "Rain fell on the garden"]
    async with open_runtime(models={"tiny": model_path}) as rt:
        alone = [(await rt.complete("tiny", p, max_tokens=40)).text for p in prompts]
        steps: list[EngineStep] = []
        remove = rt.add_step_listener("tiny", steps.append)
        together: dict[int, str] = {}

        async def plain(index: int) -> None:
            together[index] = (await rt.complete("tiny", prompts[index], max_tokens=40)).text

        async def constrained() -> None:
            reply = await rt.complete("tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                      response_format=RECORD)
            together[-1] = reply.text

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(constrained)
                for index in range(len(prompts)):
                    nursery.start_soon(plain, index)
        remove()
    assert max(len(step.outputs) for step in steps) == 8  # all eight in one batch
    assert [together[i] for i in range(len(prompts))] == alone
    _valid(together[-1])


async def test_constrained_sequences_keep_the_prefix_cache_and_stop_strings(
        model_path: str) -> None:
    # Long enough for the cache, which keeps whole blocks of tokens.
    messages = [{"role": "system", "content": "You answer in JSON records. " * 12},
                *MESSAGES]
    async with open_runtime(models={"tiny": model_path}) as rt:
        first = await rt.complete("tiny", messages=messages, max_tokens=MAX_TOKENS,
                                  response_format=RECORD)
        again = await rt.complete("tiny", messages=messages, max_tokens=MAX_TOKENS,
                                  response_format=RECORD)
        cut = await rt.complete("tiny", messages=messages, max_tokens=MAX_TOKENS,
                                response_format=RECORD, stop=[","])
    _valid(first.text)
    assert first.usage.cached_tokens == 0
    assert again.text == first.text and again.finish_reason == "stop"
    assert again.usage.cached_tokens >= first.usage.prompt_tokens - 32
    assert cut.text == first.text.split(",")[0] and cut.finish_reason == "stop"


async def test_a_killed_worker_resumes_a_constrained_stream_exactly(model_path: str) -> None:
    """Process isolation: the frames carry the grammar, and the resumed sequence's
    matcher replays the tokens already delivered before it masks the next one."""
    params: dict[str, Any] = {"max_tokens": MAX_TOKENS, "response_format": RECORD,
                              "temperature": 1.0, "seed": 5}
    config = config_from_mapping({
        "generation": {"isolation": "process"},
        "python_runtime": {"restart_delay_base_ms": 10, "restart_delay_max_ms": 100}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        whole = await rt.complete("tiny", PROCESS_PROMPT, **params)
        with trio.fail_after(60):
            text, _ = await stream_with_kill(rt, 12, **params)
    _valid(whole.text)
    assert text == whole.text


async def test_json_rpc_takes_response_format(model_path: str) -> None:
    with trio.fail_after(30):
        async with serve_jsonrpc(model_path) as (_, listener):
            client = await Client.connect(listener)
            params = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 1.0,
                      "seed": 9, "response_format": RECORD}
            whole = await client.result("complete", params)
            started = await client.result("generate", params)
            chunks, end = await client.stream_end(started["stream_id"])
            bad = await client.call("complete", {
                **params, "response_format": {"type": "json_schema", "json_schema": {
                    "name": "bad", "schema": {"type": "strin"}}}})
            after = await client.result("complete", {"prompt": "Hello", "max_tokens": 4})
    _valid(whole["text"])
    assert whole["finish_reason"] == "stop"
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert end["params"]["finish_reason"] == "stop"
    assert bad["error"]["code"] == -32004 and "Invalid type: strin" in bad["error"]["message"]
    assert after["finish_reason"] == "length"


async def test_the_embedded_api_takes_typed_formats_and_lark_grammars(model_path: str) -> None:
    typed = JsonSchemaFormat(JsonSchema(name="record", schema=SCHEMA, strict=True))
    async with open_runtime(models={"tiny": model_path}) as rt:
        reply = await rt.complete("tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                  response_format=typed, temperature=0.7, seed=1)
        with pytest.raises(EngineClientError) as caught:
            await rt.complete("tiny", "Hi", response_format={"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    _valid(reply.text)
    assert caught.value.code is Code.GUIDANCE_ERROR
    assert caught.value.spec.http == 400
    check_grammar(lark_grammar('start: "yes" | "no"'))
    with pytest.raises(EngineClientError, match="unknown name"):
        check_grammar(lark_grammar("start: nothing_here"), field="tool_choice")


async def test_the_engine_masks_resumes_and_ends_where_the_grammar_accepts(
        model_path: str) -> None:
    """Engine level: every token a constrained sequence emits is one its grammar
    allows, the last is EOS where the grammar accepts, and a sequence resumed with the
    first tokens already delivered continues with exactly the same tokens."""
    import llguidance
    import mlx_lm

    grammar = json_schema_grammar(SCHEMA)
    sampling = SamplingParams(temperature=1.0, seed=21)
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        prompt = await engine.tokenize("A record:")
        engine.submit(seq(1, prompt, MAX_TOKENS, sampling, grammar=grammar))
        await recorder.wait_finished(1)
        tokens = recorder.tokens[1]
        engine.submit(seq(2, prompt, MAX_TOKENS - 9, sampling, generated=tokens[:9],
                          grammar=grammar))
        engine.submit(seq(3, prompt, MAX_TOKENS))  # unconstrained, alongside
        await recorder.wait_finished(2, 3)
    assert recorder.finish[1] == "stop" and recorder.finish[2] == "stop"
    assert recorder.tokens[2] == tokens[9:]
    _valid(recorder.text(1))
    _, tokenizer = mlx_lm.load(model_path)
    matcher = llguidance.LLMatcher(
        llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), eos_token=[1]), grammar)
    assert matcher.consume_tokens(tokens[:-1]) and matcher.is_accepting()
    assert tokens[-1] in tokenizer.eos_token_ids


def test_a_grammar_for_a_model_that_cannot_take_one_is_refused() -> None:
    sequence = seq(1, [5, 6], 4, SamplingParams(), grammar=json_object_grammar())
    validate_sequence(sequence, 592)
    with pytest.raises(EngineClientError, match="grammar"):
        validate_sequence(sequence, 592, structured_output=False)


def test_grammars_are_checked_once_per_grammar_string() -> None:
    text = json_schema_grammar({"type": "object", "properties": {"k": {"type": "integer"}}})
    before = compile_problem.cache_info()
    for _ in range(5):
        check_grammar(text)
    after = compile_problem.cache_info()
    assert after.hits - before.hits >= 4 and after.misses - before.misses <= 1
    assert after.maxsize == GRAMMAR_CACHE_SIZE


def test_strict_refuses_keywords_llguidance_lacks_and_non_strict_ignores_them() -> None:
    schema = {"type": "object", "not": {"required": ["x"]}}
    strict = JsonSchemaFormat(JsonSchema(name="s", schema=schema, strict=True))
    lenient = JsonSchemaFormat(JsonSchema(name="s", schema=schema))
    strict_grammar = response_format_grammar(strict)
    lenient_grammar = response_format_grammar(lenient)
    assert strict_grammar is not None and lenient_grammar is not None
    with pytest.raises(EngineClientError, match="Unimplemented keys") as caught:
        check_grammar(strict_grammar)
    assert caught.value.code is Code.GUIDANCE_ERROR
    assert caught.value.details["field"] == "response_format"
    check_grammar(lenient_grammar)
    assert response_format_grammar(TextFormat()) is None
    assert response_format_grammar(None) is None
