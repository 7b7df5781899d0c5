"""The progress watchdog on the real tiny model: slow work is not a stall, a real stall is
caught, a stuck engine thread is never doubled, and a stream that keeps stalling ends.

The "slow" fault makes every step sleep 10 ms per prompt token it prefills (a machine
that prefills at 100 tokens/s); "stuck" blocks one step for 2 s, deaf to `close`; "hang"
blocks it until the engine is closed. The limits here are a few hundred milliseconds,
and each assertion keeps a margin of several times that, so a loaded machine passes.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest
import structlog
import trio
from tests.conftest import wait_until

from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import Code, CorralError
from corral.protocol.messages import EngineStep
from corral.runtime import Runtime, open_runtime

pytestmark = pytest.mark.slow

# About 190 tokens of the tiny model: 1.9 s of "slow" prefill, far over a 1 s floor if
# it were one step.
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 16)
PROMPT = "The quick brown fox"


def _config(isolation: str, **generation: Any) -> RuntimeConfig:
    return config_from_mapping({
        "generation": {"isolation": isolation, "prefix_cache": {"enabled": False},
                       **generation},
        "supervision": {"backoff": {"min_ms": 1, "max_ms": 10}},
        "python_runtime": {"max_restarts": 10, "restart_period_ms": 60000,
                           "restart_delay_base_ms": 10, "restart_delay_max_ms": 100,
                           "heartbeat_interval_ms": 200},
        "stream_registry": {"max_active_streams": 16, "max_queued": 16},
    })


def _restarts(rt: Runtime) -> list[int]:
    return [m.restarts for m in rt.list_models()]


async def _ready(rt: Runtime, restarts: int) -> None:
    def ready() -> bool:
        (model,) = rt.list_models()
        return model.restarts == restarts and model.state == "ready"

    await wait_until(ready, timeout=60)


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_slow_prefill_is_cut_into_steps_and_never_called_a_stall(
        model_path: str, isolation: str) -> None:
    async with open_runtime(_config(isolation), models={"tiny": model_path}) as rt:
        fault_free = await rt.complete("tiny", LONG_PROMPT, max_tokens=8)
    assert fault_free.usage.prompt_tokens > 150
    # A machine this slow from the start: the engine learns its speed from the first
    # chunk, which is small, and sizes the next ones to the target.
    config = _config(isolation, stall_timeout_ms=1000, prefill_step_target_ms=250)
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        await rt.inject_fault("tiny", "slow")
        steps: list[EngineStep] = []
        rt.add_step_listener("tiny", steps.append)
        with structlog.testing.capture_logs() as logs, trio.fail_after(60):
            slow = await rt.complete("tiny", LONG_PROMPT, max_tokens=8)
        assert not [e for e in logs if e["event"] == "model.engine_stalled"]
        assert slow.text == fault_free.text
        assert _restarts(rt) == [0]
        # Each chunk was a step the watchdog saw: the prompt took many of them.
        prefilled_at = next(i for i, step in enumerate(steps) if step.prefilled)
        assert prefilled_at >= 4
        assert rt.health().ok


async def test_a_stuck_engine_thread_is_waited_for_never_doubled(model_path: str) -> None:
    config = _config("thread", stall_timeout_ms=300)
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        fault_free = (await rt.complete("tiny", PROMPT, max_tokens=40)).text
        most_threads = 0
        saw_stalled_health = False

        async def watch_threads() -> None:
            nonlocal most_threads, saw_stalled_health
            while True:
                engines = [t for t in threading.enumerate()
                           if t.name.startswith("corral-engine")]
                most_threads = max(most_threads, len(engines))
                saw_stalled_health |= any("stalled" in r for r in rt.health().reasons)
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_threads)
            with trio.fail_after(60):
                async with rt.generate("tiny", PROMPT, max_tokens=40) as stream:
                    injected = False
                    async for _ in stream:
                        if len(stream.token_ids) >= 5 and not injected:
                            injected = True
                            await rt.inject_fault("tiny", "stuck")
            nursery.cancel_scope.cancel()
        assert stream.text == fault_free
        assert _restarts(rt) == [1]
        assert most_threads == 1
        assert saw_stalled_health
        await _ready(rt, 1)
        assert (await rt.complete("tiny", PROMPT, max_tokens=40)).text == fault_free


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_stream_whose_engine_stalls_a_third_time_ends_with_a_typed_error(
        model_path: str, isolation: str) -> None:
    config = _config(isolation, stall_timeout_ms=300)
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        with trio.fail_after(120), pytest.raises(CorralError) as caught:
            async with rt.generate("tiny", PROMPT, max_tokens=1500) as stream:
                stalls = 0
                async for _ in stream:
                    if stalls < 3 and len(stream.token_ids) > 0:
                        await _ready(rt, stalls)
                        stalls += 1
                        await rt.inject_fault("tiny", "hang")
        error = caught.value
        assert error.code is Code.GENERATION_ERROR and not error.retryable
        assert error.details["stalls"] == 3
        assert "stalled 3 times" in error.message
        await _ready(rt, 3)  # the third stall restarted the model too
        assert (await rt.complete("tiny", PROMPT, max_tokens=8)).finish_reason == "length"


async def test_sigstop_of_the_worker_is_caught_within_the_stall_timeout(
        model_path: str) -> None:
    # Heartbeats every 200 ms: a frozen worker is silent for five of them (1 s), well
    # inside the 30 s stall timeout.
    config = _config("process", stall_timeout_ms=30_000)
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        fault_free = (await rt.complete("tiny", PROMPT, max_tokens=48)).text
        stopped = 0
        began = 0.0
        with trio.fail_after(60):
            async with rt.generate("tiny", PROMPT, max_tokens=48) as stream:
                async for _ in stream:
                    if len(stream.token_ids) >= 5 and not stopped:
                        stats = rt.engine_statistics("tiny")
                        stopped = getattr(stats, "pid", 0)
                        began = trio.current_time()
                        os.kill(stopped, signal.SIGSTOP)
        assert stream.text == fault_free
        assert trio.current_time() - began < 30.0
        assert _restarts(rt) == [1]
        await wait_until(lambda: not _exists(stopped), timeout=30)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
