"""A model's cached and default fallbacks, served by the runtime, over HTTP (the official
openai client) and JSON-RPC-shaped `Completion`, with the header, the metrics counter
and the rolling error metrics of `runtime/state`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from corral import aio
from corral.actors.child_spec import ChildSpec
from corral.config import config_from_mapping
from corral.metrics import Metrics
from corral.protocol.errors import CircuitBreakerOpenError, Code, EngineClientError
from corral.runtime import Runtime, open_runtime
from corral.server.http import HttpServer
from corral.server.jsonrpc import JsonRpcListener
from test_jsonrpc_server import Client

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def runtime(model_path: str) -> AsyncIterator[Runtime]:
    config = config_from_mapping({
        "logging": {"level": "warning"},
        "calls": {"retry": {"initial_delay_ms": 1, "max_delay_ms": 5}},
        "generation": {"models": [
            {"alias": "tiny", "path": model_path,
             "fallbacks": [{"cached_ttl_ms": 60_000}, {"default": "busy, try later"}]},
            {"alias": "plain", "path": model_path}]}})
    async with open_runtime(config) as rt:
        yield rt


async def test_cached_then_default_then_served_again(runtime: Runtime) -> None:
    rt = runtime
    first = await rt.complete("tiny", PROMPT, max_tokens=6)
    assert first.fallback is None
    rt.circuit_breaker("tiny").force_open()
    cached = await rt.complete("tiny", PROMPT, max_tokens=6)
    assert (cached.fallback, cached.model, cached.text, cached.token_ids) == (
        "cached", "tiny", first.text, first.token_ids)
    other = await rt.complete("tiny", PROMPT, max_tokens=7)  # other parameters: no cache
    assert (other.fallback, other.text, other.finish_reason) == (
        "default", "busy, try later", "stop")
    # A client error is never hidden by a fallback.
    with pytest.raises(EngineClientError) as caught:
        await rt.complete("tiny", "", max_tokens=3)
    assert caught.value.code is Code.INVALID_PARAMS
    # A model without response fallbacks gets the typed error.
    rt.circuit_breaker("plain").force_open()
    with pytest.raises(CircuitBreakerOpenError):
        await rt.complete("plain", PROMPT, max_tokens=3)
    rt.circuit_breaker("tiny").reset()
    again = await rt.complete("tiny", PROMPT, max_tokens=6)
    assert again.fallback is None and again.text == first.text

    state = rt.resilience()
    assert state.fallbacks_total == {"tiny": {"cached": 1, "default": 1}}
    window = state.windows.rates["1m"]
    assert window.fallbacks == {"cached": 1, "default": 1}
    assert window.errors_by_code == {"CircuitOpen": 3}  # the open-circuit refusals
    assert window.successes == 2
    latency = state.windows.latency["tiny"]["1m"]
    assert latency.count == 2 and 0 < latency.p50_ms <= latency.p99_ms
    assert state.breakers["tiny"].transitions == 2
    assert state.breakers["plain"].state == "forced_open"
    assert state.breakers["plain"].time_open_s >= 0.0
    stats = await rt.statistics()
    assert stats.resilience is not None and stats.resilience.fallbacks_total == \
        state.fallbacks_total


async def test_http_says_which_fallback_served_it(runtime: Runtime) -> None:
    rt = runtime
    metrics = Metrics(rt)
    port = _free_port()
    await rt.start_transport(ChildSpec(
        name="http", factory=lambda: HttpServer(rt, "127.0.0.1", port, metrics)))

    def run() -> dict[str, Any]:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0)
        with client:
            seen: dict[str, Any] = {}
            plain = client.completions.with_raw_response.create(
                model="tiny", prompt=PROMPT, max_tokens=5)
            seen["plain"] = (plain.headers.get("x-corral-fallback"), plain.parse())
            rt.circuit_breaker("tiny").force_open()
            cached = client.completions.with_raw_response.create(
                model="tiny", prompt=PROMPT, max_tokens=5)
            seen["cached"] = (cached.headers.get("x-corral-fallback"), cached.parse())
            default = client.chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            seen["default"] = (default.headers.get("x-corral-fallback"), default.parse())
            with client.chat.completions.with_streaming_response.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                    stream=True) as streamed:
                seen["streamed"] = (streamed.headers.get("x-corral-fallback"),
                                    "".join(c.choices[0].delta.content or ""
                                            for c in streamed.parse() if c.choices))
            rt.circuit_breaker("tiny").reset()
            after = client.completions.with_raw_response.create(
                model="tiny", prompt=PROMPT, max_tokens=5)
            seen["after"] = (after.headers.get("x-corral-fallback"), after.parse())
            return seen

    seen = await trio.to_thread.run_sync(run)
    assert seen["plain"][0] is None
    assert seen["cached"][0] == "cached"
    assert seen["cached"][1].choices[0].text == seen["plain"][1].choices[0].text
    assert seen["cached"][1].model == "tiny"
    assert seen["default"][0] == "default"
    assert seen["default"][1].choices[0].message.content == "busy, try later"
    assert seen["streamed"] == ("default", "busy, try later")
    assert seen["after"][0] is None
    assert seen["after"][1].choices[0].text == seen["plain"][1].choices[0].text
    families = {f.name: f for f in text_string_to_metric_families(
        (await metrics.render()).decode())}
    counted = {(s.labels["model"], s.labels["fallback"]): s.value
               for s in families["corral_fallbacks"].samples if s.name.endswith("_total")}
    assert counted == {("tiny", "cached"): 1.0, ("tiny", "default"): 2.0}
    [transitions] = [s.value for s in families["corral_breaker_transitions"].samples
                     if s.labels["model"] == "tiny" and s.name.endswith("_total")]
    assert transitions == 2.0  # forced open, then reset
    assert "corral_breaker_open_seconds" in families
    metrics.close()


def test_asyncio_runtime_reads_the_rolling_metrics_and_the_fallback(model_path: str) -> None:
    async def main() -> None:
        config = config_from_mapping({"logging": {"level": "warning"}, "generation": {
            "models": [{"alias": "tiny", "path": model_path,
                        "fallbacks": [{"default": "later"}]}]}})
        async with aio.open_runtime(config) as rt:
            assert (await rt.complete("tiny", PROMPT, max_tokens=3)).fallback is None

            async def force_open(trio_rt: Runtime) -> None:
                trio_rt.circuit_breaker("tiny").force_open()

            await rt.run_in_trio(force_open)
            served = await rt.complete("tiny", PROMPT, max_tokens=3)
            assert (served.fallback, served.text) == ("default", "later")
            state = await rt.resilience()
            assert state.windows.rates["1m"].successes == 1
            assert state.fallbacks_total == {"tiny": {"default": 1}}
            assert state.breakers["tiny"].state == "forced_open"

    asyncio.run(main())


async def test_jsonrpc_runtime_state_carries_the_resilience_figures(runtime: Runtime) -> None:
    rt = runtime
    listener = JsonRpcListener(rt, "tcp://127.0.0.1:0")
    await rt.start_transport(listener.spec("jsonrpc"))
    client = await Client.connect(listener)
    completed = await client.call("complete", {"model": "tiny", "prompt": PROMPT,
                                               "max_tokens": 4})
    assert completed["result"]["fallback"] is None
    rt.circuit_breaker("tiny").force_open()
    served = await client.call("complete", {"model": "tiny", "prompt": PROMPT,
                                            "max_tokens": 4})
    assert served["result"]["fallback"] == "cached"
    assert served["result"]["text"] == completed["result"]["text"]
    started = await client.call("generate", {"model": "tiny", "prompt": "other",
                                             "max_tokens": 4})
    assert started["result"]["fallback"] == "default"
    while not any(n["method"] == "stream.end" for n in client.notifications):
        client.notifications.append(await client.message())
    text = "".join(n["params"]["text"] for n in client.notifications
                   if n["method"] == "stream.chunk")
    assert text == "busy, try later"
    state = (await client.call("runtime/state"))["result"]["resilience"]
    assert set(state["windows"]["rates"]) == {"1m", "5m", "15m"}
    assert state["windows"]["rates"]["15m"]["successes"] == 1
    assert state["windows"]["latency"]["tiny"]["5m"]["count"] == 1
    assert state["fallbacks_total"] == {"tiny": {"cached": 1, "default": 1}}
    assert state["breakers"]["tiny"]["state"] == "forced_open"
    assert state["breakers"]["tiny"]["transitions"] == 1
    rt.circuit_breaker("tiny").reset()
    again = await client.call("complete", {"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
    assert again["result"]["fallback"] is None
    await client.aclose()
