"""corral.aio: the trio runtime as a guest on an asyncio loop, on the real tiny model.

Every test is a plain function that runs its own loop with `asyncio.run`, so pytest-trio
(trio_mode) leaves it alone and no asyncio plugin is needed. References come from the
trio facade under `trio.run` in the same session. As in test_runtime, an MLX thread
computes in real time: the tests count engine steps, not seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import trio

from corral import aio
from corral.bench import aio_generation
from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import (
    ActorExitedError,
    Code,
    CorralError,
    EngineClientError,
    EscalationError,
    OverloadedError,
)
from corral.protocol.messages import EngineStep
from corral.runtime import Runtime, open_runtime

PROMPT = "The quick brown fox"
PROMPTS = [f"{PROMPT} {i}" for i in range(8)]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"


def _config(**overrides: Any) -> RuntimeConfig:
    base: dict[str, Any] = {
        "stream_registry": {"max_active_streams": 16, "max_queued": 4},
        "supervision": {"backoff": {"min_ms": 1, "max_ms": 10}},
        "python_runtime": {"restart_delay_base_ms": 1, "restart_delay_max_ms": 10}}
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return config_from_mapping(base)


ERROR_CASES: list[tuple[str, dict[str, Any]]] = [
    ("unknown model", {"model": "nope"}),
    ("max_tokens", {"max_tokens": 0}),
    ("temperature", {"temperature": 7}),
    ("unknown field", {"bogus": 1}),
    ("empty prompt", {"prompt": ""}),
]


def _error_call(case: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    params = dict(case)
    return params.pop("model", "tiny"), params.pop("prompt", PROMPT), params


@pytest.fixture(scope="session")
def trio_reference(model_path: str) -> dict[str, Any]:
    """What the trio facade answers: completions, streamed chunks, tokens, errors."""

    async def run() -> dict[str, Any]:
        async with open_runtime(_config(), models={"tiny": model_path}) as rt:
            chunks: list[list[int]] = []
            async with rt.generate("tiny", PROMPT, max_tokens=24) as stream:
                async for chunk in stream:
                    chunks.append(chunk.token_ids)
            errors = {}
            for name, case in ERROR_CASES:
                model, prompt, params = _error_call(case)
                try:
                    await rt.complete(model, prompt, **params)
                except CorralError as exc:
                    errors[name] = exc
            complete = await rt.complete("tiny", PROMPT, max_tokens=24)
            return {
                "complete": complete,
                "detokenized": await rt.detokenize("tiny", complete.token_ids),
                "streamed": [i for ids in chunks for i in ids],
                "tokens": await rt.tokenize("tiny", PROMPT),
                "batch": [await rt.complete("tiny", p, max_tokens=12 + i)
                          for i, p in enumerate(PROMPTS)],
                "errors": errors,
            }

    return trio.run(run)


def run_aio(model_path: str, body: Callable[[aio.Runtime], Awaitable[Any]],
            config: RuntimeConfig | None = None) -> Any:
    """`body(rt)` on a fresh asyncio loop with a corral.aio runtime serving "tiny"."""

    async def main() -> Any:
        async with aio.open_runtime(config or _config(), models={"tiny": model_path}) as rt:
            return await body(rt)

    return asyncio.run(main())


class StepTap:
    """Per engine step, which streams got a token (a step listener, in trio)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[int]]] = []

    async def attach(self, rt: aio.Runtime) -> StepTap:
        async def add(trio_rt: Runtime) -> None:
            trio_rt.add_step_listener("tiny", self._record)

        await rt.run_in_trio(add)
        return self

    def _record(self, step: EngineStep) -> None:
        self.steps.append((step.step, [o.seq_id for o in step.outputs]))

    def steps_of(self, stream_id: int) -> list[int]:
        return [step for step, ids in self.steps if stream_id in ids]


async def engine_steps(rt: aio.Runtime) -> int:
    async def steps(trio_rt: Runtime) -> int:
        stats = trio_rt.engine_statistics("tiny")
        assert stats is not None
        return stats.steps

    return await rt.run_in_trio(steps)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("corral-engine")]


# -- the same output --------------------------------------------------------------------


def test_greedy_output_through_aio_equals_the_trio_facade(
        model_path: str, trio_reference: dict[str, Any]) -> None:
    async def body(rt: aio.Runtime) -> None:
        reference = trio_reference["complete"]
        result = await rt.complete("tiny", PROMPT, max_tokens=24)
        assert result.token_ids == reference.token_ids
        assert result.text == reference.text
        assert (result.finish_reason, result.usage) == (reference.finish_reason,
                                                        reference.usage)

        ids: list[int] = []
        texts: list[str] = []
        async with rt.generate("tiny", PROMPT, max_tokens=24) as stream:
            async for chunk in stream:
                assert chunk.index == len(ids)
                ids.extend(chunk.token_ids)
                texts.append(chunk.text)
        assert ids == trio_reference["streamed"] == reference.token_ids
        assert "".join(texts) == stream.text == reference.text
        assert stream.finish_reason == reference.finish_reason
        assert stream.usage == reference.usage

        tokens = await rt.tokenize("tiny", PROMPT)
        assert tokens == trio_reference["tokens"]
        assert await rt.detokenize("tiny", reference.token_ids) == \
            trio_reference["detokenized"]
        assert [m.alias for m in await rt.list_models()] == ["tiny"]
        health = await rt.health()
        assert health.ok and health.active_streams == 0

        # trio runs once per thread: a second runtime on this loop is refused, clearly.
        with pytest.raises(RuntimeError, match="one runtime per loop"):
            async with aio.open_runtime(_config()):
                pass
        assert (await rt.complete("tiny", PROMPT, max_tokens=4)).token_ids == \
            reference.token_ids[:4]

    run_aio(model_path, body)


def test_eight_concurrent_streams_from_asyncio_tasks(
        model_path: str, trio_reference: dict[str, Any]) -> None:
    async def body(rt: aio.Runtime) -> None:
        tap = await StepTap().attach(rt)

        async def one(i: int) -> tuple[list[int], str | None]:
            ids: list[int] = []
            async with rt.generate("tiny", PROMPTS[i], max_tokens=12 + i) as stream:
                async for chunk in stream:
                    assert chunk.index == len(ids)
                    ids.extend(chunk.token_ids)
            return ids, stream.finish_reason

        results = await asyncio.gather(*(one(i) for i in range(8)))
        for (ids, finish_reason), reference in zip(results, trio_reference["batch"],
                                                    strict=True):
            assert ids == reference.token_ids
            assert finish_reason == reference.finish_reason
        # They shared the batch: some engine step served several of them at once.
        assert max(len(ids) for _, ids in tap.steps) > 1
        assert (await rt.statistics()).registry.active == 0

    run_aio(model_path, body)


# -- cancellation -----------------------------------------------------------------------


def test_cancelling_an_asyncio_task_mid_stream_stops_its_sequence_at_the_next_step(
        model_path: str) -> None:
    async def body(rt: aio.Runtime) -> None:
        tap = await StepTap().attach(rt)
        five = asyncio.Event()
        opened: list[int] = []

        async def reader() -> None:
            async with rt.generate("tiny", PROMPT, max_tokens=2000) as stream:
                opened.append(stream.stream_id)
                async for _ in stream:
                    if len(stream.token_ids) >= 5:
                        five.set()

        task = asyncio.create_task(reader())
        await five.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The task ends only after trio has left the stream's block, so the model has
        # been told; the engine may finish the step it was in, and no other.
        cancelled_at = await engine_steps(rt)
        await rt.complete("tiny", PROMPT, max_tokens=8)  # keep the engine stepping
        (stream_id,) = opened
        assert tap.steps_of(stream_id)
        assert max(tap.steps_of(stream_id)) <= cancelled_at + 1
        assert (await rt.statistics()).registry.active == 0

    run_aio(model_path, body)


def test_cancelling_a_complete_cancels_its_generation(model_path: str) -> None:
    async def body(rt: aio.Runtime) -> None:
        tap = await StepTap().attach(rt)
        task = asyncio.create_task(rt.complete("tiny", PROMPT, max_tokens=2000))
        while len(tap.steps) < 6:
            await asyncio.sleep(0.001)
        stream_id = tap.steps[-1][1][0]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_at = await engine_steps(rt)
        await rt.complete("tiny", PROMPT, max_tokens=8)
        assert max(tap.steps_of(stream_id)) <= cancelled_at + 1
        assert (await rt.statistics()).registry.active == 0

    run_aio(model_path, body)


def test_a_cancelled_read_loses_no_output(
        model_path: str, trio_reference: dict[str, Any]) -> None:
    async def body(rt: aio.Runtime) -> None:
        ids: list[int] = []
        timeouts = 0
        async with rt.generate("tiny", PROMPT, max_tokens=24) as stream:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), timeout=0.0005)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    timeouts += 1
                    continue
                assert chunk.index == len(ids)
                ids.extend(chunk.token_ids)
        assert timeouts > 0
        assert ids == trio_reference["complete"].token_ids

    run_aio(model_path, body)


def test_a_slow_reader_gets_coalesced_output_and_an_idle_one_is_cancelled(
        model_path: str, trio_reference: dict[str, Any]) -> None:
    config = _config(stream_registry={"idle_reader_timeout_ms": 200})

    async def body(rt: aio.Runtime) -> None:
        chunks: list[list[int]] = []
        async with rt.generate("tiny", PROMPT, max_tokens=24) as stream:
            async for chunk in stream:
                chunks.append(chunk.token_ids)
                await asyncio.sleep(0.02)  # slower than the engine, within the limit
        assert [i for ids in chunks for i in ids] == trio_reference["complete"].token_ids
        assert len(chunks) < 24  # the runtime coalesced what waited for the reader

        received = 0
        async with rt.generate("tiny", PROMPT, max_tokens=2000) as stream:
            with pytest.raises(EngineClientError) as caught:
                async for chunk in stream:
                    received += len(chunk.token_ids)
                    if received == len(chunk.token_ids):
                        await asyncio.sleep(1.0)  # idle, five times the limit
        assert caught.value.code is Code.CANCELLED
        assert "idle" in caught.value.message
        assert received < 2000

    run_aio(model_path, body, config)


# -- errors -----------------------------------------------------------------------------


def test_typed_errors_cross_as_the_same_exception_class(
        model_path: str, trio_reference: dict[str, Any]) -> None:
    async def body(rt: aio.Runtime) -> None:
        for name, case in ERROR_CASES:
            expected = trio_reference["errors"][name]
            model, prompt, params = _error_call(case)
            with pytest.raises(CorralError) as completed:
                await rt.complete(model, prompt, **params)
            with pytest.raises(CorralError) as streamed:
                async with rt.generate(model, prompt, **params):
                    pass
            for caught in (completed.value, streamed.value):
                assert type(caught) is type(expected), name
                assert (caught.code, caught.message, caught.details) == \
                    (expected.code, expected.message, expected.details), name
        with pytest.raises(EngineClientError) as unloaded:
            await rt.unload_model("nope")
        assert unloaded.value.code is Code.MODEL_NOT_LOADED
        assert (await rt.complete("tiny", PROMPT, max_tokens=2)).finish_reason == "length"

    run_aio(model_path, body)


def test_an_overfull_registry_answers_overloaded(model_path: str) -> None:
    config = _config(stream_registry={"max_active_streams": 1, "max_queued": 1})

    async def body(rt: aio.Runtime) -> None:
        async with rt.generate("tiny", PROMPT, max_tokens=2000) as running:
            await running.__anext__()
            queued = asyncio.create_task(rt.complete("tiny", PROMPT, max_tokens=2))
            while (await rt.statistics()).registry.queued < 1:
                await asyncio.sleep(0.001)
            with pytest.raises(OverloadedError) as caught:
                await rt.complete("tiny", PROMPT, max_tokens=2)
            assert caught.value.retry_after_ms > 0
            assert caught.value.retryable
        assert (await queued).finish_reason == "length"

    run_aio(model_path, body, config)


def test_a_model_that_fails_to_load_raises_from_open_runtime(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(EngineClientError) as caught:
            async with aio.open_runtime(_config(), models={"bad": str(tmp_path / "none")}):
                pytest.fail("the block must not run")
        assert caught.value.code is Code.MODEL_LOAD_ERROR
        assert not trio.lowlevel.in_trio_run()

    asyncio.run(main())


def test_a_failed_runtime_raises_its_escalation_from_calls_and_the_block(
        model_path: str) -> None:
    async def main() -> None:
        with pytest.raises(EscalationError) as raised:
            async with aio.open_runtime(_config(supervision={"max_restarts": 0}),
                                        models={"tiny": model_path}) as rt:
                async def kill_registry(trio_rt: Runtime) -> None:
                    trio_rt.kill("root/stream_registry")

                await rt.run_in_trio(kill_registry)
                called: CorralError | None = None
                for _ in range(100):
                    try:
                        await rt.complete("tiny", PROMPT, max_tokens=2000)
                    except ActorExitedError:
                        continue  # raced the escalation: the registry was gone
                    except EscalationError as exc:
                        called = exc
                        break
        assert called is raised.value
        assert "stream_registry" in str(raised.value)
        assert not trio.lowlevel.in_trio_run()

    asyncio.run(main())


# -- shutdown ---------------------------------------------------------------------------


def test_leaving_the_context_with_streams_open_stops_the_runtime_cleanly(
        model_path: str, trio_reference: dict[str, Any]) -> None:
    outcomes: dict[str, BaseException | None] = {}

    def shutting_down(error: BaseException | None) -> bool:
        return (isinstance(error, EngineClientError) and error.code is Code.SERVER_ERROR
                and error.retryable and error.details.get("shutting_down") is True)

    async def main() -> None:
        started = asyncio.Event()

        async def record(name: str, coro: Awaitable[Any]) -> None:
            try:
                await coro
                outcomes[name] = None
            except Exception as exc:  # noqa: BLE001 - recorded, checked below
                outcomes[name] = exc

        async def reading(rt: aio.Runtime) -> None:
            async with rt.generate("tiny", PROMPT, max_tokens=2000) as stream:
                async for _ in stream:
                    started.set()

        async def idle(rt: aio.Runtime, resume: asyncio.Event) -> None:
            async with rt.generate("tiny", PROMPT, max_tokens=2000) as stream:
                await stream.__anext__()
                await resume.wait()  # the runtime closes meanwhile
                async for _ in stream:
                    pass

        resume = asyncio.Event()
        async with aio.open_runtime(_config(), models={"tiny": model_path}) as rt:
            trio_rt = await rt.run_in_trio(_itself)
            tasks = [asyncio.create_task(record("reading", reading(rt))),
                     asyncio.create_task(record("idle", idle(rt, resume))),
                     asyncio.create_task(record("complete", rt.complete(
                         "tiny", PROMPT, max_tokens=2000)))]
            await started.wait()
            while (await rt.statistics()).registry.active < 3:
                await asyncio.sleep(0.001)
        resume.set()
        await asyncio.gather(*tasks)
        assert not trio_rt.stream_buffers()
        assert not trio.lowlevel.in_trio_run()
        with pytest.raises(EngineClientError) as late:
            await rt.complete("tiny", PROMPT)
        assert shutting_down(late.value)
        # The guest run ended cleanly: a new runtime runs on this same loop.
        async with aio.open_runtime(_config(), models={"tiny": model_path}) as again:
            result = await again.complete("tiny", PROMPT, max_tokens=24)
            assert result.token_ids == trio_reference["complete"].token_ids

    asyncio.run(main())
    assert set(outcomes) == {"reading", "idle", "complete"}
    assert all(shutting_down(error) for error in outcomes.values()), outcomes
    for thread in engine_threads():
        thread.join(timeout=5)
    assert not engine_threads()


async def _itself(trio_rt: Runtime) -> Runtime:
    return trio_rt


def test_the_runtime_stops_cleanly_when_asyncio_run_ends_with_it_open(
        model_path: str) -> None:
    seen: dict[str, Any] = {}

    async def serve(streaming: asyncio.Event) -> None:
        try:
            async with aio.open_runtime(_config(), models={"tiny": model_path}) as rt:
                seen["trio_rt"] = await rt.run_in_trio(_itself)
                async with rt.generate("tiny", PROMPT, max_tokens=2000) as stream:
                    async for _ in stream:
                        streaming.set()
        except BaseException as exc:
            seen["exit"] = exc
            raise

    async def main() -> None:
        streaming = asyncio.Event()
        asyncio.get_running_loop().create_task(serve(streaming))
        await streaming.wait()
        # Returning leaves `serve` running: asyncio.run cancels it and waits for it.

    asyncio.run(main())
    assert isinstance(seen["exit"], asyncio.CancelledError)
    assert not seen["trio_rt"].stream_buffers()
    assert not trio.lowlevel.in_trio_run()
    for thread in engine_threads():
        thread.join(timeout=5)
    assert not engine_threads()


# -- the FastAPI example ----------------------------------------------------------------


def _example() -> ModuleType:
    pytest.importorskip("fastapi")
    spec = importlib.util.spec_from_file_location("corral_fastapi_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _events(body: str) -> list[tuple[str, str]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event", "message"), fields["data"]))
    return events


def test_the_fastapi_example_streams_through_the_asgi_transport(
        model_path: str, trio_reference: dict[str, Any]) -> None:
    app = _example().create_app(_config(), {"tiny": model_path})
    reference = trio_reference["complete"]

    async def main() -> None:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://corral") as client:
            response = await client.post(
                "/generate", json={"prompt": PROMPT, "max_tokens": 24})
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = _events(response.text)
            assert events[-1] == ("message", "[DONE]")
            chunks = [json.loads(data) for _, data in events[:-2]]
            assert [i for c in chunks for i in c["token_ids"]] == reference.token_ids
            assert "".join(c["text"] for c in chunks) == reference.text
            assert json.loads(events[-2][1])["finish_reason"] == reference.finish_reason

            complete = await client.post("/complete", json={"prompt": PROMPT,
                                                            "max_tokens": 24})
            assert complete.json()["token_ids"] == reference.token_ids

            missing = await client.post("/generate", json={"prompt": PROMPT, "model": "x"})
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "ModelNotLoaded"
            bad = await client.post("/generate", json={"prompt": PROMPT, "max_tokens": 0})
            assert bad.status_code == 400
            assert bad.json()["error"]["code"] == "InvalidParams"

            health = await client.get("/health")
            assert health.status_code == 200 and health.json()["ok"] is True

    asyncio.run(main())


def test_the_fastapi_example_streams_from_a_real_server_and_a_disconnect_cancels(
        model_path: str, trio_reference: dict[str, Any]) -> None:
    hypercorn_asyncio = pytest.importorskip("hypercorn.asyncio")
    from hypercorn.config import Config

    app = _example().create_app(_config(), {"tiny": model_path})
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket from here
    config.accesslog = config.errorlog = None
    reference = trio_reference["complete"]

    async def main() -> None:
        stop = asyncio.Event()
        server = asyncio.create_task(
            hypercorn_asyncio.serve(app, config, shutdown_trigger=stop.wait))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await _wait_healthy(client)
                ids: list[int] = []
                async with client.stream("POST", "/generate", json={
                        "prompt": PROMPT, "max_tokens": 24}) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {") and '"token_ids"' in line:
                            ids.extend(json.loads(line[6:])["token_ids"])
                assert ids == reference.token_ids

                # A client that goes away mid-stream cancels its generation.
                async with client.stream("POST", "/generate", json={
                        "prompt": PROMPT, "max_tokens": 2000}) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            break
                for _ in range(2000):
                    if (await client.get("/health")).json()["active_streams"] == 0:
                        break
                    await asyncio.sleep(0.005)
                assert (await client.get("/health")).json()["active_streams"] == 0
        finally:
            stop.set()
            await server

    asyncio.run(main())


async def _wait_healthy(client: httpx.AsyncClient) -> None:
    for _ in range(1000):
        with contextlib.suppress(httpx.TransportError):
            if (await client.get("/health")).status_code == 200:
                return
        await asyncio.sleep(0.01)
    pytest.fail("the server did not come up")


# -- the benchmark ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_bench_measures_aio_against_trio_in_one_run(model_path: str) -> None:
    results = aio_generation.measure(model_path, smoke=True)
    parameters = results["aio_parameters"]
    assert results["aio_single_tokens"] == [parameters["max_tokens"]] * parameters["rounds"]
    assert results["aio_batch_tokens"] == \
        [parameters["streams"] * parameters["batch_max_tokens"]] * parameters["rounds"]
    assert results["aio_single_decode_ratio"] > 0 and results["aio_batch_ratio"] > 0
    assert {g.name for g in aio_generation.goals(results)} == {
        "aio_single_decode_ratio", "aio_batch_ratio"}
    assert len(aio_generation.rows(results)) == 2
