"""Process isolation through the runtime: real workers, real signals, resumed streams.

Real processes run in real time, so waits are bounded with trio.fail_after and steps
or restarts are counted instead of asserting durations.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import CircuitBreakerOpenError, Code, CorralError
from corral.runtime import Runtime, open_runtime

PROMPT = "The quick brown fox"
GREEDY: dict[str, Any] = {"max_tokens": 48}
SEEDED: dict[str, Any] = {"max_tokens": 48, "temperature": 0.9, "top_p": 0.95, "seed": 11}

pytestmark = pytest.mark.slow


def _config(max_restarts: int = 10, **generation: Any) -> RuntimeConfig:
    return config_from_mapping({
        "generation": {"isolation": "process", **generation},
        "python_runtime": {"max_restarts": max_restarts, "restart_period_ms": 60000,
                           "restart_delay_base_ms": 10, "restart_delay_max_ms": 100,
                           "heartbeat_interval_ms": 200},
        "stream_registry": {"max_active_streams": 16, "max_queued": 256},
    })


@pytest.fixture
async def rt(model_path: str) -> AsyncIterator[Runtime]:
    async with open_runtime(_config(), models={"tiny": model_path}) as runtime:
        yield runtime


def worker_pid(rt: Runtime, alias: str = "tiny") -> int | None:
    stats = rt.engine_statistics(alias)
    return getattr(stats, "pid", None) if stats is not None else None


async def wait_for_new_worker(rt: Runtime, old_pid: int, alias: str = "tiny") -> int:
    with trio.fail_after(30):
        while True:
            pid = worker_pid(rt, alias)
            model = {m.alias: m for m in rt.list_models()}[alias]
            if pid not in (None, old_pid) and model.state == "ready":
                return pid
            await trio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


async def stream_with_kill(rt: Runtime, after: int, **params: Any) -> tuple[str, int]:
    """Stream a request and SIGKILL the worker once `after` tokens have arrived."""
    killed_pid = 0
    async with rt.generate("tiny", PROMPT, **params) as stream:
        async for _ in stream:
            if len(stream.token_ids) >= after and not killed_pid:
                killed_pid = worker_pid(rt) or 0
                os.kill(killed_pid, signal.SIGKILL)
    assert killed_pid
    return stream.text, killed_pid


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_kill_9_mid_stream_the_client_sees_the_fault_free_text(
        rt: Runtime, params: dict[str, Any]) -> None:
    fault_free = (await rt.complete("tiny", PROMPT, **params)).text
    with trio.fail_after(60):
        text, killed = await stream_with_kill(rt, 8, **params)
    assert text == fault_free
    assert not alive(killed)
    new_pid = await wait_for_new_worker(rt, killed)
    assert alive(new_pid)
    assert (await rt.complete("tiny", PROMPT, **params)).text == fault_free
    assert [m.restarts for m in rt.list_models()] == [1]


async def test_kill_9_mid_stream_an_unseeded_request_gets_its_partial_text(rt: Runtime) -> None:
    with trio.fail_after(60), pytest.raises(CorralError) as caught:
        await stream_with_kill(rt, 8, max_tokens=400, temperature=0.9)
    error = caught.value
    assert error.code is Code.GENERATION_ERROR and error.retryable
    assert len(error.details["partial_text"]) > 0
    assert error.details["completion_tokens"] >= 8
    old = worker_pid(rt)
    pid = await wait_for_new_worker(rt, old or 0) if old is None else old
    assert alive(pid)
    assert (await rt.complete("tiny", PROMPT, max_tokens=4)).finish_reason == "length"


async def test_a_hung_worker_is_caught_by_the_watchdog_and_the_stream_resumes(
        model_path: str) -> None:
    async with open_runtime(_config(stall_timeout_ms=400),
                            models={"tiny": model_path}) as rt:
        fault_free = (await rt.complete("tiny", PROMPT, **GREEDY)).text
        hung = worker_pid(rt)
        async with rt.generate("tiny", PROMPT, **GREEDY) as stream:
            injected = False
            with trio.fail_after(60):
                async for _ in stream:
                    if len(stream.token_ids) >= 5 and not injected:
                        injected = True
                        await rt.inject_fault("tiny", "hang")
        assert stream.text == fault_free
        assert hung is not None and not alive(hung)
        assert [m.restarts for m in rt.list_models()] == [1]


async def test_exceeding_max_restarts_fails_the_model_and_holds_its_circuit_open(
        model_path: str) -> None:
    async with open_runtime(_config(max_restarts=1),
                            models={"tiny": model_path, "other": model_path}) as rt:
        for _ in range(2):  # the first kill restarts; the second exceeds max_restarts=1
            pid = worker_pid(rt)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(30):
                while worker_pid(rt) == pid:
                    await trio.sleep(0.02)
            with trio.fail_after(30):
                while {m.alias: m for m in rt.list_models()}["tiny"].state not in (
                        "ready", "failed"):
                    await trio.sleep(0.02)
        with trio.fail_after(30):
            while {m.alias: m for m in rt.list_models()}["tiny"].state != "failed":
                await trio.sleep(0.02)
        health = rt.health()
        assert not health.ok
        assert "model tiny failed" in health.reasons
        with pytest.raises(CircuitBreakerOpenError) as caught:
            await rt.complete("tiny", PROMPT, max_tokens=4)
        assert caught.value.state == "forced_open"
        # The other model, and the rest of the tree, keep serving.
        assert (await rt.complete("other", PROMPT, max_tokens=4)).finish_reason == "length"
        assert all(d.state == "running" for d in health.domains)


def worker_processes(parent: int | None = None) -> set[int]:
    """The live `corral.engine.worker` children of `parent` (this process by default)."""
    parent = parent or os.getpid()
    children: set[int] = set()
    for task in os.listdir(f"/proc/{parent}/task"):
        try:
            with open(f"/proc/{parent}/task/{task}/children") as listing:
                children.update(int(pid) for pid in listing.read().split())
        except OSError:
            continue
    workers = set()
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"corral.engine.worker" in cmdline.read() and alive(pid):
                    workers.add(pid)
        except OSError:
            continue
    return workers


async def standby_of(rt: Runtime, alias: str = "tiny") -> int:
    """The pid of the worker waiting beside the serving one, once it has started."""
    with trio.fail_after(30):
        while True:
            waiting = worker_processes() - {worker_pid(rt, alias)}
            if len(waiting) == 1:
                return waiting.pop()
            await trio.sleep(0.02)


async def test_a_restart_adopts_the_standby_worker_and_a_new_one_starts(
        model_path: str) -> None:
    async with open_runtime(_config(), models={"tiny": model_path}) as rt:
        serving = worker_pid(rt)
        assert serving is not None
        standby = await standby_of(rt)
        fault_free = (await rt.complete("tiny", PROMPT, **GREEDY)).text
        with trio.fail_after(60):
            text, killed = await stream_with_kill(rt, 8, **GREEDY)
        assert killed == serving and text == fault_free
        assert await wait_for_new_worker(rt, serving) == standby
        next_standby = await standby_of(rt)
        assert next_standby not in (serving, standby)
        assert (await rt.complete("tiny", PROMPT, **GREEDY)).text == fault_free
        workers = worker_processes()
    assert workers == {standby, next_standby}
    assert not any(alive(pid) for pid in workers), "closing the runtime left a worker"


async def test_unloading_a_model_stops_its_standby_and_none_starts_when_off(
        model_path: str) -> None:
    async with open_runtime(_config(), models={"tiny": model_path}) as rt:
        standby = await standby_of(rt)
        await rt.unload_model("tiny")
        assert not alive(standby)
        assert worker_processes() == set()
    off = config_from_mapping({"generation": {"isolation": "process"},
                               "python_runtime": {"standby_worker": False}})
    async with open_runtime(off, models={"tiny": model_path}) as rt:
        assert (await rt.complete("tiny", PROMPT, max_tokens=4)).finish_reason == "length"
        assert worker_processes() == {worker_pid(rt)}


def test_a_killed_runtime_leaves_no_worker(model_path: str, tmp_path: Any) -> None:
    script = textwrap.dedent(f"""
        import sys, trio
        from corral.config import config_from_mapping
        from corral.runtime import open_runtime
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_isolation import worker_processes as workers

        async def main():
            config = config_from_mapping({{"generation": {{"isolation": "process"}}}})
            async with open_runtime(config, models={{"a": {model_path!r}, "b": {model_path!r}}}) as rt:
                while len(workers()) < 4:  # each model's worker and its standby
                    await trio.sleep(0.02)
                print(" ".join(map(str, workers())), flush=True)
                await trio.sleep_forever()

        trio.run(main)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 4 and all(alive(p) for p in pids)
        parent.kill()
        parent.wait(timeout=10)
        # A worker armed its parent-death signal goes at once; one still starting (a
        # standby the runtime had just spawned) goes as soon as it arms it, which on a
        # loaded machine can take seconds of interpreter start.
        deadline = threading.Event()
        for _ in range(600):
            if not any(alive(p) for p in pids):
                break
            deadline.wait(0.05)
        assert not any(alive(p) for p in pids), "a worker outlived its killed runtime"
    finally:
        parent.kill()
        parent.wait(timeout=10)


async def test_chaos_200_requests_with_a_worker_killed_about_every_second(
        model_path: str) -> None:
    requests = [({**GREEDY, "max_tokens": 16 + i % 17} if i % 2 == 0 else
                 {**SEEDED, "max_tokens": 16 + i % 17, "seed": i}) for i in range(200)]
    prompts = [f"{PROMPT} {i % 13}" for i in range(200)]
    config = _config(max_restarts=100)
    threads_before = threading.active_count()
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        fault_free = {}
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(16)

            async def reference(i: int) -> None:
                async with limiter:
                    fault_free[i] = (await rt.complete("tiny", prompts[i], **requests[i])).text

            for i in range(200):
                nursery.start_soon(reference, i)

        results: dict[int, str | BaseException] = {}
        kills: list[int] = []

        async def chaos() -> None:
            # A kill each time another 40 requests have ended: on this machine that is
            # about every second, and the number of kills does not depend on its speed.
            for threshold in (40, 80, 120, 160):
                while len(results) < threshold:
                    await trio.sleep(0.01)
                pid = worker_pid(rt)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
                await wait_for_new_worker(rt, pid)

        async def one(i: int, limiter: trio.CapacityLimiter) -> None:
            async with limiter:
                try:
                    result = await rt.complete("tiny", prompts[i], timeout_ms=60_000,
                                               **requests[i])
                    results[i] = result.text
                except CorralError as exc:
                    results[i] = exc

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chaos)
                async with trio.open_nursery() as clients:
                    limiter = trio.CapacityLimiter(16)
                    for i in range(200):
                        clients.start_soon(one, i, limiter)
                nursery.cancel_scope.cancel()

        assert len(results) == 200  # none lost, none hung
        failures = {i: r for i, r in results.items() if isinstance(r, BaseException)}
        assert not failures, failures
        assert all(results[i] == fault_free[i] for i in range(200))
        assert len(kills) == 4
        assert not any(alive(p) for p in kills)
        state = await rt.statistics()
        assert state.registry.active == 0 and state.registry.queued == 0
        assert not rt.stream_buffers()
        live_pid = worker_pid(rt)
    assert live_pid is not None and not alive(live_pid)
    # No engine thread or worker-reaper thread outlives the runtime.
    with trio.fail_after(10):
        while threading.active_count() > threads_before:
            await trio.sleep(0.05)
