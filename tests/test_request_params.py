"""One request type (issue 22, items 1 and 2): every numeric bound of the OpenAI and
JSON-RPC edges is the bound the engine applies, declared once on `SamplingParams`; and
`min_tokens` and `ignore_eos`, added to that type alone, work over HTTP, JSON-RPC and
embedded.

The bounds are read off the type (`msgspec.inspect`), so a knob added later is covered
without touching this file. A value around each bound is accepted at one edge exactly
when it is accepted at the other, by the engine's own check of a sequence built in
Python, and by the worker frame that carries a sequence to another process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.engine.base import validate_sequence
from corral.protocol.codec import DecodeError, Decoder, encode
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.jsonrpc import Request, params_as
from corral.protocol.messages import EngineSequence, GenerateParams
from corral.protocol.sampling import MAX_INT32, SamplingParams
from corral.protocol.serving_messages import Submit
from corral.protocol.worker import ToWorker
from corral.server.openai import chat_job, completion_job
from test_http import Served, served  # noqa: F401  (the fixture)
from test_jsonrpc_server import PROMPT, Client, serve

# -- the bounds, read off the types ----------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """A numeric constraint somewhere in a field: `where` is "value", "key" (of a
    mapping) or "item" (of a list)."""

    field: str
    where: str
    kind: type
    low: float | None
    low_open: bool
    high: float | None
    high_open: bool


Numeric = msgspec.inspect.IntType | msgspec.inspect.FloatType


def _numeric(node: msgspec.inspect.Type) -> Numeric | None:
    if isinstance(node, msgspec.inspect.UnionType):
        for member in node.types:
            found = _numeric(member)
            if found is not None:
                return found
        return None
    return node if isinstance(node, msgspec.inspect.IntType | msgspec.inspect.FloatType) else None


def _bound(field: str, where: str, node: msgspec.inspect.Type) -> Bound | None:
    number = _numeric(node)
    if number is None:
        return None
    low = number.ge if number.ge is not None else number.gt
    high = number.le if number.le is not None else number.lt
    if low is None and high is None:
        return None
    kind = int if isinstance(number, msgspec.inspect.IntType) else float
    return Bound(field, where, kind, low, number.gt is not None, high, number.lt is not None)


def bounds_of(struct: type[msgspec.Struct]) -> list[Bound]:
    """Every numeric bound of `struct`'s fields, their mappings' keys and values and
    their lists' items."""
    found = []
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        node = field.type
        members = node.types if isinstance(node, msgspec.inspect.UnionType) else (node,)
        candidates = [("value", node)]
        for member in members:
            if isinstance(member, msgspec.inspect.DictType):
                candidates += [("key", member.key_type), ("value", member.value_type)]
            elif isinstance(member, msgspec.inspect.ListType):
                candidates.append(("item", member.item_type))
        for where, candidate in candidates:
            bound = _bound(field.name, where, candidate)
            if bound is not None:
                found.append(bound)
    return found


SAMPLING_BOUNDS = bounds_of(SamplingParams)
EDGE_ONLY = ("n", "timeout_ms")  # bounded at both edges, not the engine's business


def test_the_bounds_cover_every_numeric_knob() -> None:
    names = {(b.field, b.where) for b in SAMPLING_BOUNDS}
    assert {("temperature", "value"), ("top_p", "value"), ("top_k", "value"),
            ("min_p", "value"), ("seed", "value"), ("repetition_penalty", "value"),
            ("presence_penalty", "value"), ("frequency_penalty", "value"),
            ("logit_bias", "key"), ("logit_bias", "value"), ("max_tokens", "value"),
            ("min_tokens", "value"), ("stop_token_ids", "item"),
            ("top_logprobs", "value")} <= names


def _around(bound: Bound) -> st.SearchStrategy[Any]:
    """Values at, just inside and just outside each end of `bound`, and between."""
    ends = [end for end in (bound.low, bound.high) if end is not None]
    if bound.kind is int:
        near = [int(end) + step for end in ends for step in (-1, 0, 1)]
        low, high = min(near), max(near)
        return st.sampled_from(near) | st.integers(low, high)
    near_f = [x for end in ends for x in (end, math.nextafter(end, -math.inf),
                                          math.nextafter(end, math.inf), end - 1, end + 1)]
    return (st.sampled_from(near_f) | st.floats(min(near_f), max(near_f))
            | st.sampled_from([math.nan, math.inf, -math.inf]))


def _placed(bound: Bound, value: Any, *, json: bool) -> dict[str, Any]:
    """The field holding `value` where the bound applies (a JSON body's mapping keys
    are strings)."""
    if bound.where == "key":
        return {bound.field: {str(value) if json else value: 1.0}}
    if bound.where == "item":
        return {bound.field: [value]}
    if bound.field == "logit_bias":
        return {bound.field: {"5" if json else 5: value}}
    return {bound.field: value}


def _accepted(call: Any) -> bool:
    try:
        call()
    except EngineClientError as error:
        assert error.code is Code.INVALID_PARAMS, error
        return False
    return True


def _openai(fields: dict[str, Any]) -> bool:
    """Accepted by both OpenAI endpoints (the two must agree)."""
    chat_fields = dict(fields)
    completion_fields = dict(fields)
    if "top_logprobs" in fields:  # chat's needs logprobs; completions calls it logprobs
        chat_fields["logprobs"] = True
        completion_fields = {"logprobs": fields["top_logprobs"]}
    chat = _accepted(lambda: chat_job(
        {"messages": [{"role": "user", "content": "hi"}], **chat_fields}, "r", "c"))
    completion = _accepted(lambda: completion_job({"prompt": "hi", **completion_fields},
                                                  "r", "c"))
    assert chat == completion, fields
    return chat


def _jsonrpc(fields: dict[str, Any]) -> bool:
    return _accepted(lambda: params_as(
        Request("2.0", "generate", {"prompt": "hi", **fields}, 1), GenerateParams))


def _engine(fields: dict[str, Any]) -> bool:
    """Accepted by the engine's check of a sequence built in Python, and (the same
    answer) by the frame that carries it to a worker process."""
    try:
        sampling = SamplingParams(**{"max_tokens": 4, **fields})
    except (TypeError, ValueError):
        return False
    seq = EngineSequence(1, [1], sampling)
    checked = _accepted(lambda: validate_sequence(seq, MAX_INT32 + 1))
    try:
        Decoder(ToWorker).decode(encode(Submit(seq)))
        framed = True
    except DecodeError:
        framed = False
    assert checked == framed, fields
    return checked


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_bound_is_the_same_at_both_edges_and_in_the_engine(data: st.DataObject) -> None:
    bound = data.draw(st.sampled_from(SAMPLING_BOUNDS))
    value = data.draw(_around(bound))
    at_openai = _openai(_placed(bound, value, json=True))
    at_jsonrpc = _jsonrpc(_placed(bound, value, json=True))
    in_engine = _engine(_placed(bound, value, json=False))
    assert at_openai == at_jsonrpc == in_engine, (bound, value)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_the_request_bounds_are_the_same_at_both_edges(data: st.DataObject) -> None:
    bound = data.draw(st.sampled_from([b for b in bounds_of(GenerateParams)
                                       if b.field in EDGE_ONLY]))
    value = data.draw(_around(bound))
    assert _openai({bound.field: value}) == _jsonrpc({bound.field: value}), (bound, value)


# -- min_tokens and ignore_eos, end to end -------------------------------------------------

EOS_FIRST = {"1": 100.0}  # the tiny model's EOS (id 1), made the greedy choice


@pytest.mark.slow
async def test_min_tokens_holds_eos_and_stop_tokens_back_everywhere(served: Served) -> None:
    rt = served.rt
    (eos,) = rt.list_models()[0].info.eos_token_ids  # type: ignore[union-attr]
    bias = {eos: 100.0}
    at_once = await rt.complete("tiny", PROMPT, max_tokens=8, logit_bias=bias)
    assert at_once.token_ids == [eos] and at_once.finish_reason == "stop"
    held = await rt.complete("tiny", PROMPT, max_tokens=8, logit_bias=bias, min_tokens=4)
    assert held.finish_reason == "stop" and len(held.token_ids) == 5
    assert eos not in held.token_ids[:4] and held.token_ids[4] == eos
    # A stop token is held back too, and so is a stop string in the first tokens.
    plain = await rt.complete("tiny", PROMPT, max_tokens=8)
    first = plain.token_ids[0]
    stopped = await rt.complete("tiny", PROMPT, max_tokens=8, stop_token_ids=[first],
                                min_tokens=3)
    assert first not in stopped.token_ids[:3] and len(stopped.token_ids) >= 3
    stop = plain.text[1:3]
    assert (await rt.complete("tiny", PROMPT, max_tokens=8, stop=[stop])).text == plain.text[:1]
    late = await rt.complete("tiny", PROMPT, max_tokens=8, stop=[stop], min_tokens=6)
    assert late.text.startswith(plain.text[:3])
    # A continuation's tokens count toward min_tokens, as toward max_tokens.
    resumed = await rt.complete("tiny", PROMPT, max_tokens=8, logit_bias=bias, min_tokens=4,
                                generated=held.token_ids[:2])
    assert resumed.token_ids == held.token_ids[2:]

    def over_http(client: openai.OpenAI) -> tuple[list[str | None], list[int]]:
        chat = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                         logit_bias=EOS_FIRST, extra_body={"min_tokens": 4})
        usage = chat.usage
        assert usage is not None
        return [chat.choices[0].finish_reason], [usage.completion_tokens]

    finish, tokens = await served.sync(over_http)
    assert finish == ["stop"] and tokens == [5]


@pytest.mark.slow
async def test_ignore_eos_runs_to_max_tokens_everywhere(served: Served) -> None:
    rt = served.rt
    (eos,) = rt.list_models()[0].info.eos_token_ids  # type: ignore[union-attr]
    bias = {eos: 100.0}
    ran = await rt.complete("tiny", PROMPT, max_tokens=6, logit_bias=bias, ignore_eos=True)
    assert ran.finish_reason == "length" and ran.token_ids == [eos] * 6
    # A stop token still ends it.
    stopped = await rt.complete("tiny", PROMPT, max_tokens=6, logit_bias=bias,
                                ignore_eos=True, stop_token_ids=[eos])
    assert stopped.finish_reason == "stop" and stopped.token_ids == [eos]

    def over_http(client: openai.OpenAI) -> tuple[str, int]:
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
            logit_bias=EOS_FIRST, extra_body={"ignore_eos": True})
        assert chat.usage is not None
        return chat.choices[0].finish_reason, chat.usage.completion_tokens

    assert await served.sync(over_http) == ("length", 6)


@pytest.mark.slow
async def test_min_tokens_and_ignore_eos_over_jsonrpc(model_path: str) -> None:
    async with serve(model_path) as (_, listener):
        client = await Client.connect(listener)
        common = {"prompt": PROMPT, "max_tokens": 6, "logit_bias": EOS_FIRST}
        held = await client.result("complete", {**common, "min_tokens": 4})
        assert held["finish_reason"] == "stop" and len(held["token_ids"]) == 5
        ran = await client.result("complete", {**common, "ignore_eos": True})
        assert ran["finish_reason"] == "length" and ran["token_ids"] == [1] * 6
        refused = await client.call("complete", {**common, "min_tokens": -1})
        assert refused["error"]["data"]["field"] == "min_tokens"
        await client.aclose()
