"""The HTTP transport over the wire: the real server on 127.0.0.1, the official client.

The server runs in the test's trio loop; the `openai` clients (sync, and asyncio) run in
worker threads. The MLX thread computes in real time, so waits poll with a deadline and
engine progress is counted in steps observed at the registry, as in test_runtime.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import structlog
import trio
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from corral.actors.child_spec import ChildSpec
from corral.config import RuntimeConfig, config_from_mapping
from corral.metrics import Metrics
from corral.protocol.errors import ChildStartError, CorralError
from corral.protocol.lifecycle import LifecycleEvent
from corral.runtime import Runtime, open_runtime
from corral.server.http import HttpServer
from test_runtime import StepTap, engine_steps

PROMPT = "The quick brown fox"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about foxes."}]


def _config(**overrides: Any) -> RuntimeConfig:
    base: dict[str, Any] = {
        "stream_registry": {"max_active_streams": 16, "max_queued": 4},
        "supervision": {"backoff": {"min_ms": 1, "max_ms": 10}},
        "python_runtime": {"restart_delay_base_ms": 1, "restart_delay_max_ms": 10},
        "server": {"drain_timeout_ms": 1000},
        "logging": {"level": "info"}}  # the access log is at info; embedded, the default is warning
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return config_from_mapping(base)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    rt: Runtime
    metrics: Metrics
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="x", max_retries=0,
                             **options)

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="x", max_retries=0,
                                  **options)

    async def sync(self, fn: Callable[[openai.OpenAI], Any], **options: Any) -> Any:
        """Run `fn(client)` with a sync client in a worker thread."""
        def run() -> Any:
            with self.client(**options) as client:
                return fn(client)

        return await trio.to_thread.run_sync(run)

    async def run_asyncio(self, fn: Callable[[openai.AsyncOpenAI], Any]) -> Any:
        """Run `await fn(client)` with an asyncio client, in an asyncio loop in a thread."""
        async def main() -> Any:
            async with self.async_client() as client:
                return await fn(client)

        return await trio.to_thread.run_sync(asyncio.run, main())

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await trio.to_thread.run_sync(
            lambda: httpx.get(f"{self.base_url}{path}", timeout=10, **kwargs))

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await trio.to_thread.run_sync(
            lambda: httpx.post(f"{self.base_url}{path}", timeout=10, **kwargs))


async def serve_http(rt: Runtime) -> Served:
    """A real HTTP server for `rt` on 127.0.0.1, on a free port."""
    metrics = Metrics(rt)
    port = _free_port()
    await rt.start_transport(ChildSpec(
        name="http", factory=lambda: HttpServer(rt, "127.0.0.1", port, metrics)))
    return Served(rt, metrics, port)


@pytest.fixture
async def served(model_path: str) -> AsyncIterator[Served]:
    async with open_runtime(_config(), models={"tiny": model_path}) as rt:
        server = await serve_http(rt)
        yield server
        server.metrics.close()


async def registry_active(rt: Runtime) -> int:
    return (await rt.statistics()).registry.active


async def _active_is_zero(rt: Runtime) -> bool:
    return await registry_active(rt) == 0


# -- completions and chat, sync and async -----------------------------------------------


async def test_sync_client_chat_and_completions(served: Served) -> None:
    def run(client: openai.OpenAI) -> Any:
        chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12,
                                              logprobs=True)
        text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7,
                                         logprobs=0)
        return chat, text

    chat, text = await served.sync(run)
    reference = await served.rt.complete("tiny", PROMPT, max_tokens=7)
    assert chat.object == "chat.completion"
    assert chat.model == "tiny"
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 0 < chat.usage.completion_tokens <= 12
    assert chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert len(choice.logprobs.content) == chat.usage.completion_tokens
    assert all(item.logprob <= 0.0 for item in choice.logprobs.content)
    assert text.object == "text_completion"
    assert text.choices[0].text == reference.text
    assert text.choices[0].finish_reason == reference.finish_reason
    assert text.usage.completion_tokens == len(reference.token_ids)
    pieces = [await served.rt.detokenize("tiny", [t]) for t in reference.token_ids]
    assert text.choices[0].logprobs.tokens == pieces  # each token decoded alone


async def test_streaming_adds_up_to_the_whole_reply(served: Served) -> None:
    def run(client: openai.OpenAI) -> Any:
        whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20)
        chunks = list(client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=20, stream=True,
            stream_options={"include_usage": True}))
        text_whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20)
        text_chunks = list(client.completions.create(model="tiny", prompt=PROMPT,
                                                     max_tokens=20, stream=True))
        return whole, chunks, text_whole, text_chunks

    whole, chunks, text_whole, text_chunks = await served.sync(run)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].text for c in text_chunks) == text_whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == text_whole.choices[0].finish_reason


async def test_async_client_chat_and_completions(served: Served) -> None:
    async def run(client: openai.AsyncOpenAI) -> Any:
        chat = await client.chat.completions.create(model="tiny", messages=CHAT,
                                                    max_tokens=10)
        stream = await client.chat.completions.create(model="tiny", messages=CHAT,
                                                      max_tokens=10, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        text = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10)
        text_stream = await client.completions.create(model="tiny", prompt=PROMPT,
                                                      max_tokens=10, stream=True)
        text_streamed = "".join([c.choices[0].text async for c in text_stream])
        return chat, streamed, text, text_streamed

    chat, streamed, text, text_streamed = await served.run_asyncio(run)
    assert streamed == chat.choices[0].message.content
    assert text_streamed == text.choices[0].text
    assert text.choices[0].text == (await served.rt.complete("tiny", PROMPT, max_tokens=10)).text


async def test_stop_and_max_tokens(served: Served) -> None:
    reference = (await served.rt.complete("tiny", PROMPT, max_tokens=40)).text
    stop = reference[12:15]
    expected = reference[:reference.index(stop)]

    def run(client: openai.OpenAI) -> Any:
        stopped = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                            stop=[stop])
        streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                                  stop=stop, stream=True))
        short = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
        return stopped, streamed, short

    stopped, streamed, short = await served.sync(run)
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3


async def test_seed_makes_sampling_repeatable(served: Served) -> None:
    def run(client: openai.OpenAI) -> list[str]:
        def once(seed: int) -> str:
            reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20,
                                              temperature=0.9, top_p=0.95, seed=seed)
            return reply.choices[0].text

        return [once(1234), once(1234), once(99)]

    first, second, other = await served.sync(run)
    assert first == second
    assert first != other


async def test_sixteen_concurrent_streams(served: Served,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tap = StepTap(served.rt)

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, Any]:
        stream = await client.completions.create(
            model="tiny", prompt=f"{PROMPT} {i}", max_tokens=8 + i, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
        return text, usage

    async def run(client: openai.AsyncOpenAI) -> list[tuple[str, Any]]:
        return list(await asyncio.gather(*(one(client, i) for i in range(16))))

    results = await served.run_asyncio(run)
    assert max(len(ids) for _, ids in tap.steps) > 1  # they shared engine steps
    for i, (text, usage) in enumerate(results):
        alone = await served.rt.complete("tiny", f"{PROMPT} {i}", max_tokens=8 + i)
        assert text == alone.text
        assert usage.completion_tokens == len(alone.token_ids)


# -- client disconnects -------------------------------------------------------------------


async def _assert_sequence_stopped(rt: Runtime, tap: StepTap) -> None:
    """The one stream the tap saw left the batch: the registry closed it and the engine
    produced nothing more for it after the step it was cancelled at."""
    await wait_until(lambda: _active_is_zero(rt))
    cancelled_at = engine_steps(rt)
    [stream_id] = {sid for _, ids in tap.steps for sid in ids}
    await rt.complete("tiny", PROMPT, max_tokens=8)  # keep the engine stepping
    steps = tap.steps_of(stream_id)
    assert max(steps) <= cancelled_at + 1, (steps[-5:], cancelled_at)
    assert len(steps) < 1000


async def test_a_client_that_disconnects_mid_stream_stops_its_sequence(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    tap = StepTap(served.rt)

    def run(client: openai.OpenAI) -> int:
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2000,
                                           stream=True)
        seen = 0
        for _ in stream:
            seen += 1
            if seen == 5:
                break
        stream.close()
        return seen

    assert await served.sync(run) == 5
    await _assert_sequence_stopped(served.rt, tap)
    text = await served.metrics.render()
    assert b'corral_requests_total{code="Cancelled",outcome="cancelled"} 1.0' in text


async def test_a_client_that_gives_up_on_a_whole_reply_stops_its_sequence(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    tap = StepTap(served.rt)

    def run(client: openai.OpenAI) -> None:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2000,
                                           timeout=0.3)

    await served.sync(run)
    await _assert_sequence_stopped(served.rt, tap)


# -- errors ------------------------------------------------------------------------------


async def test_errors_have_the_table_status_the_code_and_the_request_id(
        served: Served) -> None:
    def run(client: openai.OpenAI) -> dict[str, Any]:
        caught: dict[str, Any] = {}
        cases: dict[str, Callable[[], object]] = {
            "temperature": lambda: client.completions.create(
                model="tiny", prompt=PROMPT, temperature=7,
                extra_headers={"X-Request-Id": "req-temp"}),
            "unknown": lambda: client.completions.create(
                model="tiny", prompt=PROMPT, extra_body={"best_of_all": 3}),
            "n": lambda: client.chat.completions.create(model="tiny", messages=CHAT, n=9),
            "model": lambda: client.completions.create(model="nope", prompt=PROMPT),
            "timeout": lambda: client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=2000, extra_body={"timeout_ms": 30}),
        }
        for name, call in cases.items():
            try:
                call()
            except openai.APIStatusError as exc:
                caught[name] = exc
        return caught

    caught = await served.sync(run)
    assert isinstance(caught["temperature"], openai.BadRequestError)
    temp: Any = caught["temperature"]
    assert temp.body["code"] == "InvalidParams"
    assert temp.body["param"] == "temperature"
    assert temp.body["request_id"] == "req-temp" == temp.response.headers["x-request-id"]
    assert temp.body["type"] == "invalid_request_error"
    assert caught["unknown"].status_code == 400
    assert caught["unknown"].body["param"] == "best_of_all"
    assert caught["n"].body["message"] == "n: expected <= 8"
    assert isinstance(caught["model"], openai.NotFoundError)
    missing: Any = caught["model"]
    assert missing.body["code"] == "ModelNotLoaded"
    assert missing.body["request_id"] == missing.response.headers["x-request-id"]
    assert caught["timeout"].status_code == 504
    assert caught["timeout"].body["code"] == "Timeout"
    assert caught["timeout"].body["retryable"] is True


async def test_an_open_circuit_is_503_with_retry_after(served: Served) -> None:
    breaker = served.rt.circuit_breaker("tiny")
    breaker.force_open()

    def run(client: openai.OpenAI) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, stream=True)
        return caught.value

    error = await served.sync(run)
    assert error.status_code == 503
    assert error.body["code"] == "CircuitOpen"
    assert int(error.response.headers["retry-after"]) >= 1
    breaker.reset()
    reply = await served.sync(lambda c: c.completions.create(model="tiny", prompt=PROMPT,
                                                             max_tokens=3))
    assert reply.choices[0].finish_reason == "length"


async def test_a_full_registry_is_429_with_retry_after(model_path: str) -> None:
    config = _config(stream_registry={"max_active_streams": 1, "max_queued": 0})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        async with rt.generate("tiny", PROMPT, max_tokens=2000) as running:
            await running.__anext__()

            def run(client: openai.OpenAI) -> openai.APIStatusError:
                with pytest.raises(openai.RateLimitError) as caught:
                    client.chat.completions.create(model="tiny", messages=CHAT)
                return caught.value

            error = await served.sync(run)
        assert error.status_code == 429
        assert error.body["code"] == "Overloaded"
        assert error.response.headers["retry-after"] == "1"
        served.metrics.close()


async def test_an_error_mid_stream_is_the_last_sse_event(served: Served) -> None:
    rt = served.rt

    def run(client: openai.OpenAI) -> tuple[str, openai.APIError]:
        # Sampled without a seed, so the runtime cannot resume it after the crash.
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2000,
                                           temperature=0.8, stream=True)
        text, injected = "", False
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                text += chunk.choices[0].text
                if len(text) > 3 and not injected:
                    injected = True
                    trio.from_thread.run(rt.inject_fault, "tiny", "raise")
        return text, caught.value

    text, error = await served.sync(run)
    assert error.body["code"] == "GenerationError"
    assert error.body["retryable"] is True
    assert text

    async def reloaded() -> bool:  # the restarted model answers once its engine loaded
        try:
            await rt.tokenize("tiny", "x")
        except CorralError:
            return False
        return True

    await wait_until(reloaded)
    reply = await served.sync(lambda c: c.completions.create(model="tiny", prompt=PROMPT,
                                                             max_tokens=4))
    assert reply.choices[0].finish_reason == "length"


async def test_request_ids_and_the_access_log(served: Served) -> None:
    with structlog.testing.capture_logs() as logs:
        given = await served.post("/v1/completions", headers={"X-Request-Id": "abc-123"},
                                  json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
        bad = await served.post("/v1/chat/completions", content=b"{not json")
        missing = await served.get("/v1/nothing")

        async def all_logged() -> bool:  # a line is written once its response is sent
            return len([e for e in logs if e["event"] == "http.request"]) == 3

        await wait_until(all_logged)
    assert given.status_code == 200
    assert given.headers["x-request-id"] == "abc-123"
    assert given.json()["id"] == "cmpl-abc-123"
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "ParseError"
    assert len(bad.headers["x-request-id"]) == 32
    assert bad.json()["error"]["request_id"] == bad.headers["x-request-id"]
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "MethodNotFound"
    access = [e for e in logs if e["event"] == "http.request"]
    by_path = {e["path"]: e for e in access}
    assert {(e["method"], e["path"], e["status"]) for e in access} == {
        ("POST", "/v1/completions", 200), ("POST", "/v1/chat/completions", 400),
        ("GET", "/v1/nothing", 404)}
    assert by_path["/v1/completions"]["request_id"] == "abc-123"
    assert by_path["/v1/chat/completions"]["request_id"] == bad.headers["x-request-id"]
    assert all(e["duration_ms"] >= 0 for e in access)


# -- models, health, metrics ----------------------------------------------------------------


async def test_models(served: Served) -> None:
    def run(client: openai.OpenAI) -> Any:
        listed = client.models.list()
        one = client.models.retrieve("tiny")
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve("nope")
        return listed, one, caught.value

    listed, one, missing = await served.sync(run)
    assert [m.id for m in listed.data] == ["tiny"]
    assert one.id == "tiny"
    assert one.owned_by == "corral"
    assert missing.body["code"] == "ModelNotLoaded"


async def test_health_is_503_with_the_reason_when_a_model_failed(model_path: str) -> None:
    config = _config(python_runtime={"max_restarts": 0})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        healthy = await served.get("/health")
        assert healthy.status_code == 200
        body = healthy.json()
        assert body["status"] == "ok"
        assert [d["name"] for d in body["domains"]] == ["stream_registry", "generation",
                                                         "transport"]
        assert [m["alias"] for m in body["models"]] == ["tiny"]
        with pytest.raises(CorralError):  # the stream ends with the engine's crash
            async with rt.generate("tiny", PROMPT, max_tokens=2000) as stream:
                async for _ in stream:
                    await rt.inject_fault("tiny", "raise")
                    break
                async for _ in stream:
                    pass

        async def failed() -> bool:
            return [m.state for m in rt.list_models()] == ["failed"]

        await wait_until(failed)
        unhealthy = await served.get("/health")
        assert unhealthy.status_code == 503
        assert unhealthy.json()["status"] == "unavailable"
        assert "model tiny failed" in unhealthy.json()["reasons"]
        served.metrics.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_parse_and_count_what_happened(served: Served) -> None:
    rt = served.rt

    def run(client: openai.OpenAI) -> list[Any]:
        whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6)
        stream = list(client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=9, stream=True,
            stream_options={"include_usage": True}))
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt=PROMPT, top_p=5)
        return [whole.usage, stream[-1].usage]

    usages = await served.sync(run)
    registry = rt.actor("root/stream_registry")
    restarted = trio.Event()

    def on_event(event: LifecycleEvent) -> None:
        if event.kind == "restarted" and event.path == "root/stream_registry":
            restarted.set()

    rt.add_lifecycle_listener(on_event)
    rt.kill("root/stream_registry")
    await registry.wait_exit()
    with trio.fail_after(5):
        await restarted.wait()
    response = await served.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    tiny = (("model", "tiny"),)
    generated = sum(u.completion_tokens for u in usages)
    assert samples[("corral_time_to_first_token_seconds_count", tiny)] == 2
    assert samples[("corral_e2e_request_latency_seconds_count", tiny)] == 2
    assert samples[("corral_inter_token_latency_seconds_count", tiny)] == generated - 2
    assert samples[("corral_prompt_tokens_total", tiny)] == sum(u.prompt_tokens for u in usages)
    assert samples[("corral_generation_tokens_total", tiny)] == generated
    assert samples[("corral_requests_total", (("code", ""), ("outcome", "success")))] == 2
    assert samples[("corral_requests_total",
                    (("code", "InvalidParams"), ("outcome", "error")))] == 1
    assert samples[("corral_num_requests_running", ())] == 0
    assert samples[("corral_num_requests_waiting", ())] == 0
    assert samples[("corral_breaker_state", (("model", "tiny"), ("state", "closed")))] == 1
    assert samples[("corral_breaker_state", (("model", "tiny"), ("state", "open")))] == 0
    assert samples[("corral_retries_total", tiny)] == 0
    assert samples[("corral_actor_restarts_total", (("actor", "root/stream_registry"),))] == 1


# -- failure domains over the wire ----------------------------------------------------------


async def test_a_crashed_http_server_restarts_and_serves_again(served: Served) -> None:
    rt = served.rt
    restarted = trio.Event()

    def on_event(event: LifecycleEvent) -> None:
        if event.kind == "restarted" and event.path == "root/transport/http":
            restarted.set()

    rt.add_lifecycle_listener(on_event)
    before = await served.sync(lambda c: c.completions.create(model="tiny", prompt=PROMPT,
                                                              max_tokens=4))
    async with rt.generate("tiny", PROMPT, max_tokens=40) as in_process:
        await in_process.__anext__()
        rt.domain("transport").kill_child("http")
        with trio.fail_after(5):
            await restarted.wait()
        async for _ in in_process:
            pass
    assert in_process.finish_reason == "length"  # the transport's crash left it alone
    after = await served.sync(lambda c: c.completions.create(model="tiny", prompt=PROMPT,
                                                             max_tokens=4))
    assert after.choices[0].text == before.choices[0].text
    assert rt.actor("root/transport/http").statistics().restarts == 1
    assert (await served.get("/health")).status_code == 200


async def test_a_port_in_use_fails_the_start_with_a_clear_error(served: Served) -> None:
    rt = served.rt
    with pytest.raises(ChildStartError) as caught:
        await rt.start_transport(ChildSpec(name="http-again", factory=lambda: HttpServer(
            rt, "127.0.0.1", served.port, served.metrics)))
    assert f"cannot listen on 127.0.0.1:{served.port}" in str(caught.value)
    assert "in use" in str(caught.value)
    assert (await served.get("/health")).status_code == 200


async def test_a_stopping_server_ends_open_streams_with_an_error_event(
        model_path: str) -> None:
    """Stopped, the server drains for `server.drain_timeout_ms` (none here), then ends
    the streams still open with an error event, not a dropped connection."""
    config = _config(server={"drain_timeout_ms": 0})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        streaming = trio.Event()

        def run(client: openai.OpenAI) -> openai.APIError:
            stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2000,
                                               stream=True)
            with pytest.raises(openai.APIError) as caught:
                for _ in stream:
                    if not streaming.is_set():
                        trio.from_thread.run_sync(streaming.set)
            return caught.value

        async def client() -> None:
            error: Any = await served.sync(run)
            assert error.body["code"] == "TransportError"
            assert error.body["retryable"] is True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await streaming.wait()
            await rt.domain("transport").terminate_child("http")
        await wait_until(lambda: _active_is_zero(rt))
        served.metrics.close()
