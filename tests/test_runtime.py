"""The embedded runtime on the real tiny model: the request path end to end.

An MLX thread computes in real time, so these tests use trio's real clock and count
engine steps (observed at the registry) instead of seconds.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import mlx_lm
import pytest
import trio

from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import (
    CircuitBreakerOpenError,
    Code,
    CorralError,
    EngineClientError,
    OverloadedError,
    TimeoutError,
)
from corral.resilience.breaker_types import Outcome, State
from corral.runtime import Runtime, open_runtime

PROMPT = "The quick brown fox"


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run raw MLX in a fresh thread: MLX streams are thread-local, and the reference
    must not share one with any engine."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


@pytest.fixture(scope="session")
def reference_tokens(model_path: str) -> list[int]:
    def run() -> list[int]:
        model, tokenizer = mlx_lm.load(model_path)
        return [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=24)]

    return _in_thread(run)


def _config(**overrides: Any) -> RuntimeConfig:
    base = {"stream_registry": {"max_active_streams": 16, "max_queued": 4},
            "supervision": {"backoff": {"min_ms": 1, "max_ms": 10}},
            "python_runtime": {"restart_delay_base_ms": 1, "restart_delay_max_ms": 10}}
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return config_from_mapping(base)


@pytest.fixture
async def rt(model_path: str) -> AsyncIterator[Runtime]:
    async with open_runtime(_config(), models={"tiny": model_path}) as runtime:
        yield runtime


class StepTap:
    """Records, per engine step, which streams got a token (the runtime's step listener)."""

    def __init__(self, rt: Runtime, alias: str = "tiny") -> None:
        self.steps: list[tuple[int, list[int]]] = []
        rt.add_step_listener(alias, lambda step: self.steps.append(
            (step.step, [o.seq_id for o in step.outputs])))

    def last_step(self) -> int:
        return self.steps[-1][0] if self.steps else 0

    def steps_of(self, stream_id: int) -> list[int]:
        return [step for step, ids in self.steps if stream_id in ids]


def engine_steps(rt: Runtime, alias: str = "tiny") -> int:
    """Steps the model's engine has completed (read from the trio thread)."""
    stats = rt.engine_statistics(alias)
    assert stats is not None
    return stats.steps


async def test_greedy_output_is_token_identical_to_raw_mlx_lm(
        rt: Runtime, reference_tokens: list[int]) -> None:
    result = await rt.complete("tiny", PROMPT, max_tokens=24)
    assert result.token_ids == reference_tokens[:len(result.token_ids)]
    assert len(result.token_ids) == 24 or result.finish_reason == "stop"
    assert result.usage.completion_tokens == len(result.token_ids)
    assert result.usage.prompt_tokens == len(await rt.tokenize("tiny", PROMPT))


async def test_streaming_chunks_add_up_to_the_completion(rt: Runtime) -> None:
    texts: list[str] = []
    ids: list[int] = []
    async with rt.generate("tiny", PROMPT, max_tokens=16) as stream:
        async for chunk in stream:
            assert chunk.index == len(ids)
            texts.append(chunk.text)
            ids.extend(chunk.token_ids)
    whole = await rt.complete("tiny", PROMPT, max_tokens=16)
    assert "".join(texts) == whole.text == stream.text
    assert ids == whole.token_ids
    assert stream.finish_reason == whole.finish_reason


async def test_seeded_sampling_gives_the_same_text_twice(rt: Runtime) -> None:
    params = {"max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    first = await rt.complete("tiny", PROMPT, **params)
    second = await rt.complete("tiny", PROMPT, **params)
    other = await rt.complete("tiny", PROMPT, **{**params, "seed": 99})
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


async def test_sixteen_concurrent_streams_finish_with_their_token_counts(rt: Runtime) -> None:
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        results[i] = await rt.complete("tiny", f"{PROMPT} {i}", max_tokens=8 + i)

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(one, i)
    for i, result in results.items():
        assert result.finish_reason in ("length", "stop")
        if result.finish_reason == "length":
            assert len(result.token_ids) == 8 + i
    alone = await rt.complete("tiny", f"{PROMPT} 3", max_tokens=11)
    assert alone.token_ids == results[3].token_ids


async def test_cancelling_a_stream_stops_its_tokens_at_the_next_step(
        rt: Runtime) -> None:
    tap = StepTap(rt)
    async with rt.generate("tiny", PROMPT, max_tokens=2000) as stream:
        async for chunk in stream:
            if len(stream.token_ids) >= 5:
                break
        stream_id = stream.stream_id
    cancelled_at = engine_steps(rt)
    # Keep the engine stepping with another request, then look at what the stream got.
    await rt.complete("tiny", PROMPT, max_tokens=8)
    assert max(tap.steps_of(stream_id)) <= cancelled_at + 1, (tap.steps_of(stream_id), cancelled_at, tap.steps[-12:])
    state = await rt.statistics()
    assert state.registry.active == 0


async def test_cancelling_the_callers_scope_cancels_a_complete(
        rt: Runtime) -> None:
    tap = StepTap(rt)
    seen: list[int] = []

    async def run() -> None:
        await rt.complete("tiny", PROMPT, max_tokens=2000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        while not tap.steps or len(tap.steps) < 6:
            await trio.sleep(0.001)
        seen = [sid for _, ids in tap.steps for sid in ids]
        nursery.cancel_scope.cancel()
    cancelled_at = engine_steps(rt)
    await rt.complete("tiny", PROMPT, max_tokens=8)
    stream_id = seen[0]
    assert max(tap.steps_of(stream_id)) <= cancelled_at + 1, (tap.steps_of(stream_id), cancelled_at, tap.steps[-12:])


async def test_deadline_ends_the_stream_with_a_typed_timeout(rt: Runtime) -> None:
    with pytest.raises(TimeoutError) as caught:
        await rt.complete("tiny", PROMPT, max_tokens=100_000 // 50, timeout_ms=50,
                          request_id="req-7")
    error = caught.value
    assert error.method == "generate"
    assert error.timeout == pytest.approx(0.05)
    assert error.request_id == "req-7"
    assert error.duration >= 0.05
    assert (await rt.complete("tiny", PROMPT, max_tokens=4)).finish_reason == "length"


async def test_an_overfull_registry_answers_overloaded(model_path: str) -> None:
    config = _config(stream_registry={"max_active_streams": 1, "max_queued": 1})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        async with rt.generate("tiny", PROMPT, max_tokens=2000) as running:
            await running.__anext__()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: rt.complete("tiny", PROMPT, max_tokens=2))
                await trio.sleep(0.05)  # the second request now waits in the queue
                with pytest.raises(OverloadedError) as caught:
                    await rt.complete("tiny", PROMPT, max_tokens=2)
                assert caught.value.retry_after_ms > 0
                assert caught.value.code is Code.OVERLOADED
                nursery.cancel_scope.cancel()
        assert (await rt.complete("tiny", PROMPT, max_tokens=3)).finish_reason == "length"


@pytest.mark.parametrize(("params", "code", "field"), [
    ({"model": "nope"}, Code.MODEL_NOT_LOADED, None),
    ({"prompt": ""}, Code.INVALID_PARAMS, "prompt"),
    ({"prompt": "a\x00b"}, Code.INVALID_PARAMS, "prompt"),
    ({"prompt": "word " * 5000}, Code.INVALID_PARAMS, "prompt"),
    ({"max_tokens": 0}, Code.INVALID_PARAMS, "max_tokens"),
    ({"max_tokens": 10**6}, Code.INVALID_PARAMS, "max_tokens"),
    ({"temperature": -1}, Code.INVALID_PARAMS, "temperature"),
    ({"temperature": 7}, Code.INVALID_PARAMS, "temperature"),
    ({"top_p": 0}, Code.INVALID_PARAMS, "top_p"),
    ({"top_p": 1.5}, Code.INVALID_PARAMS, "top_p"),
    ({"bogus": 1}, Code.INVALID_PARAMS, "bogus"),
])
async def test_bad_input_gets_a_typed_error_and_the_next_request_succeeds(
        rt: Runtime, params: dict[str, Any], code: Code, field: str | None) -> None:
    call = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **params}
    model, prompt = call.pop("model"), call.pop("prompt")
    with pytest.raises(EngineClientError) as caught:
        await rt.complete(model, prompt, **call)
    assert caught.value.code is code
    if field is not None:
        assert field in caught.value.message
    assert (await rt.complete("tiny", PROMPT, max_tokens=4)).finish_reason == "length"


async def test_an_engine_fault_restarts_the_model_and_ends_unseeded_streams_with_partial_text(
        model_path: str) -> None:
    async with open_runtime(_config(), models={"tiny": model_path, "other": model_path}) as rt:
        other_tokens: list[int] = []

        async def other_stream() -> None:
            async with rt.generate("other", PROMPT, max_tokens=200) as stream:
                async for chunk in stream:
                    other_tokens.extend(chunk.token_ids)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_stream)
            with pytest.raises(CorralError) as caught:
                async with rt.generate("tiny", PROMPT, max_tokens=2000,
                                       temperature=0.8) as stream:  # unseeded: no resume
                    injected = False
                    async for _ in stream:
                        if len(stream.token_ids) >= 3 and not injected:
                            injected = True
                            await rt.inject_fault("tiny", "raise")
        error = caught.value
        assert error.code is Code.GENERATION_ERROR
        assert error.retryable
        assert error.details["partial_text"] == stream.text != ""
        assert len(other_tokens) == 200  # the other model streamed on, untouched
        # The model actor was restarted (and reloaded) and serves the next request.
        result = await rt.complete("tiny", PROMPT, max_tokens=5)
        assert result.finish_reason == "length"
        described = {m.alias: m for m in rt.list_models()}
        assert described["tiny"].restarts == 1
        assert described["other"].restarts == 0
        assert rt.circuit_breaker("tiny").statistics().failures >= 1


async def test_crashing_the_stream_registry_keeps_models_and_serves_new_streams(
        rt: Runtime) -> None:
    ref = rt.actor("root/stream_registry")
    before = ref.statistics().restarts
    rt.kill("root/stream_registry")
    reason = await ref.wait_exit()
    assert reason.abnormal
    result = await rt.complete("tiny", PROMPT, max_tokens=6)
    assert result.finish_reason == "length"
    assert [m.state for m in rt.list_models()] == ["ready"]
    assert ref.statistics().restarts == before + 1


async def test_health_reports_each_domain_and_model(rt: Runtime) -> None:
    health = rt.health()
    assert health.ok
    assert [d.name for d in health.domains] == ["stream_registry", "generation", "transport"]
    assert all(d.state == "running" for d in health.domains)
    assert [(m.alias, m.state) for m in health.models] == [("tiny", "ready")]


async def test_open_breaker_sends_requests_to_a_fallback(model_path: str) -> None:
    async with open_runtime(_config(), models={"backup": model_path}) as rt:
        await rt.load_model(model_path, alias="main", fallbacks=("backup",))
        rt.circuit_breaker("main").force_open()
        result = await rt.complete("main", PROMPT, max_tokens=3)
        assert result.model == "backup"
        await rt.unload_model("backup")
        with pytest.raises(CircuitBreakerOpenError):
            await rt.complete("main", PROMPT, max_tokens=3)


async def _stream_through_fault(rt: Runtime, kind: str, after: int, **params: Any) -> str:
    async with rt.generate("tiny", PROMPT, **params) as stream:
        injected = False
        async for _ in stream:
            if len(stream.token_ids) >= after and not injected:
                injected = True
                await rt.inject_fault("tiny", kind)  # type: ignore[arg-type]
    assert injected and stream.finish_reason == "length"
    return stream.text


@pytest.mark.parametrize("params", [
    {"max_tokens": 40},
    {"max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 7},
], ids=["greedy", "seeded"])
async def test_a_deterministic_stream_resumes_across_an_engine_crash_unbroken(
        rt: Runtime, params: dict[str, Any]) -> None:
    fault_free = (await rt.complete("tiny", PROMPT, **params)).text
    assert await _stream_through_fault(rt, "raise", 10, **params) == fault_free
    assert [m.restarts for m in rt.list_models()] == [1]


async def test_the_watchdog_restarts_a_hung_engine_and_the_stream_resumes(
        model_path: str) -> None:
    config = _config(generation={"stall_timeout_ms": 300})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        fault_free = (await rt.complete("tiny", PROMPT, max_tokens=30)).text
        with trio.fail_after(20):
            assert await _stream_through_fault(rt, "hang", 5, max_tokens=30) == fault_free
        assert [m.restarts for m in rt.list_models()] == [1]
        assert (await rt.complete("tiny", PROMPT, max_tokens=30)).text == fault_free


async def test_a_stream_survives_a_registry_crash_mid_stream(rt: Runtime) -> None:
    fault_free = (await rt.complete("tiny", PROMPT, max_tokens=60)).text
    ref = rt.actor("root/stream_registry")
    async with rt.generate("tiny", PROMPT, max_tokens=60) as stream:
        killed = False
        async for _ in stream:
            if len(stream.token_ids) >= 5 and not killed:
                killed = True
                rt.kill("root/stream_registry")
    assert killed and ref.statistics().restarts == 1
    assert stream.finish_reason == "length"
    assert stream.text == fault_free
    assert (await rt.statistics()).registry.active == 0


# -- regressions found by review ---------------------------------------------------------


async def test_every_deadline_is_enforced_not_only_the_first(model_path: str) -> None:
    config = _config(generation={"stall_timeout_ms": 60_000})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        errors: dict[int, BaseException] = {}

        async def run(timeout_ms: int) -> None:
            try:
                await rt.complete("tiny", PROMPT, max_tokens=1500, timeout_ms=timeout_ms)
            except CorralError as exc:
                errors[timeout_ms] = exc

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, 300)
                nursery.start_soon(run, 900)
                await trio.sleep(0.1)
                await rt.inject_fault("tiny", "hang")  # no step will end either stream
        assert all(isinstance(errors[t], TimeoutError) for t in (300, 900))
        assert errors[900].duration < 3.0  # type: ignore[attr-defined]


async def test_a_stream_keeps_every_token_when_the_registry_dies_with_output_queued(
        rt: Runtime) -> None:
    expected = (await rt.complete("tiny", PROMPT, max_tokens=40)).token_ids
    steps = 0

    def kill_on_eighth_step(_: Any) -> None:
        nonlocal steps
        steps += 1
        if steps == 8:  # the step's output is queued in the registry's mailbox right now
            rt.kill("root/stream_registry")

    remove = rt.add_step_listener("tiny", kill_on_eighth_step)
    async with rt.generate("tiny", PROMPT, max_tokens=40) as stream:
        with trio.fail_after(30):
            async for _ in stream:
                pass
    remove()
    assert rt.actor("root/stream_registry").statistics().restarts == 1
    assert stream.token_ids == expected


async def test_an_abandoned_admission_holds_no_slot(model_path: str) -> None:
    config = _config(stream_registry={"max_active_streams": 1, "max_queued": 0})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        with trio.move_on_after(0):  # a caller that leaves before the registry answers
            await rt.complete("tiny", PROMPT, max_tokens=3)
        assert (await rt.complete("tiny", PROMPT, max_tokens=3)).finish_reason == "length"
        assert (await rt.registry_state()).active == 0


async def test_a_caller_cancelled_while_acquiring_a_probe_gives_it_back(
        model_path: str) -> None:
    config = _config(json_rpc={"circuit_breaker": {"recovery_timeout_ms": 200}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        await _probe_given_back(rt)


async def _probe_given_back(rt: Runtime) -> None:
    breaker = rt.circuit_breaker("tiny")
    breaker.force_open()
    breaker.reset()
    config = rt.config.calls.circuit_breaker
    for _ in range(config.failure_threshold):
        permit = breaker.acquire()
        breaker.record(permit, Outcome.FAILURE)
    with trio.fail_after(config.recovery_timeout_ms / 1000 + 5):
        while breaker.state is not State.HALF_OPEN:
            await trio.sleep(0.05)
    with trio.move_on_after(0):
        await rt.complete("tiny", PROMPT, max_tokens=3)
    # The probe permit came back, so the next callers get it and close the circuit
    # (outcomes are told to the breaker, so its state follows a moment later).
    for _ in range(config.half_open_success_threshold):
        assert (await rt.complete("tiny", PROMPT, max_tokens=3)).finish_reason == "length"
    with trio.fail_after(5):
        while breaker.state is not State.CLOSED:
            await trio.sleep(0.01)
    assert breaker.statistics().ignored == 1


async def test_monitors_follow_the_model_through_reloads_and_domain_restarts(
        rt: Runtime, model_path: str) -> None:
    model_box = rt.actor("root/generation/model:tiny/model")
    assert model_box.statistics().monitors == 1
    await rt.unload_model("tiny")
    await rt.load_model(model_path, alias="tiny")
    assert rt.actor("root/generation/model:tiny/model").statistics().monitors == 1
    rt.kill("root/generation")
    with trio.fail_after(20):
        while (rt.actor("root/generation").statistics().restarts == 0
               or [m.state for m in rt.list_models()] != ["ready"] or not rt.health().ok):
            await trio.sleep(0.02)
    assert rt.actor("root/generation/model:tiny").statistics().monitors == 1
    assert rt.actor("root/generation/model:tiny/model").statistics().monitors == 1
    assert (await rt.complete("tiny", PROMPT, max_tokens=3)).finish_reason == "length"


async def test_a_caller_cancelled_while_queued_for_admission_frees_its_place(
        model_path: str) -> None:
    config = _config(stream_registry={"max_active_streams": 1, "max_queued": 1})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        async with rt.generate("tiny", PROMPT, max_tokens=2000) as running:
            await running.__anext__()
            with trio.move_on_after(0.05):  # waits in the queue, then gives up
                await rt.complete("tiny", PROMPT, max_tokens=3)
            assert (await rt.registry_state()).queued == 0
        assert (await rt.complete("tiny", PROMPT, max_tokens=3)).finish_reason == "length"
        state = await rt.registry_state()
        assert (state.active, state.queued) == (0, 0)
        assert not rt.stream_buffers()
