"""Tests for corral.engine.process and corral.engine.worker: real processes, real signals.

Workers run `python -m corral.engine.worker` on the tiny model. Time is real (other processes
do not follow a MockClock), so every wait is bounded by `trio.fail_after` and the tests
assert on what happened, not on how fast; the one exception, "promptly", allows seconds
for what takes milliseconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from conftest import wait_until
from corral.bench.report import PROMPTS as BENCH_PROMPTS
from corral.engine.api import EngineSettings
from corral.engine.process import ProcessEngine
from corral.engine.spawn import WorkerExitedError
from corral.engine.thread import Engine
from corral.protocol.codec import Decoder, FrameReader, encode, frame
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import EngineSequence, EngineStep, SamplingParams
from corral.protocol.worker import PROTOCOL_VERSION, FromWorker, Heartbeat, Hello, Load

pytestmark = pytest.mark.slow

GUARD_S = 30  # only against a hang
PROMPTLY_S = 5  # a death is noticed in milliseconds; this only bounds the wait
HEARTBEAT_MS = 100
MAX_TOKENS = 16
PROMPTS = list(BENCH_PROMPTS[:8])
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="session")
def reference(model_path: str) -> dict[str, Any]:
    """What the in-process Engine does with every prompt: the behaviour to reproduce."""

    async def run() -> dict[str, Any]:
        recorder = Recorder()
        engine = Engine(EngineSettings(model_path), on_step=recorder.on_step,
                        on_failure=recorder.on_failure)
        await engine.start()
        try:
            prompts = [await engine.tokenize(p) for p in PROMPTS]
            engine.submit(seq(0, prompts[0]))
            await recorder.wait_finished(0)
            for i, ids in enumerate(prompts):
                engine.submit(seq(100 + i, ids))
            await recorder.wait_finished(*(100 + i for i in range(len(prompts))))
            return {"prompts": prompts, "recorder": recorder,
                    "detokenized": await engine.detokenize(prompts[1][1:]),
                    "chat": await engine.apply_chat_template(CHAT),
                    "chat_open": await engine.apply_chat_template(CHAT, False)}
        finally:
            await engine.close()

    return trio.run(run)


class Recorder:
    """Every step and failure an engine reports, per sequence, with a way to wait."""

    def __init__(self) -> None:
        self.steps: list[EngineStep] = []
        self.tokens: dict[int, list[int]] = defaultdict(list)
        self.texts: dict[int, list[str]] = defaultdict(list)
        self.token_steps: dict[int, list[int]] = defaultdict(list)
        self.finish: dict[int, str] = {}
        self.failures: list[BaseException] = []
        self._changed = trio.Event()

    def on_step(self, step: EngineStep) -> None:
        self.steps.append(step)
        for out in step.outputs:
            self.tokens[out.seq_id].append(out.token)
            self.texts[out.seq_id].append(out.text)
            self.token_steps[out.seq_id].append(step.step)
            if out.finish_reason is not None:
                self.finish[out.seq_id] = out.finish_reason
        self._wake()

    def on_failure(self, error: BaseException) -> None:
        self.failures.append(error)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool], limit: float = GUARD_S) -> None:
        with trio.fail_after(limit):
            while not condition():
                await self._changed.wait()

    async def wait_finished(self, *seq_ids: int) -> None:
        await self.wait_for(lambda: all(i in self.finish for i in seq_ids))


def seq(seq_id: int, prompt: list[int], max_tokens: int = MAX_TOKENS,
        sampling: SamplingParams | None = None) -> EngineSequence:
    sampling = msgspec.structs.replace(sampling or SamplingParams(), max_tokens=max_tokens)
    return EngineSequence(seq_id, prompt, sampling)


@asynccontextmanager
async def open_process_engine(path: str, recorder: Recorder,
                              **kwargs: Any) -> AsyncIterator[ProcessEngine]:
    """A started ProcessEngine whose reader runs in a nursery of this block; closed after."""
    kwargs.setdefault("heartbeat_interval_ms", HEARTBEAT_MS)
    async with trio.open_nursery() as nursery:
        engine = ProcessEngine(EngineSettings(path), on_step=recorder.on_step,
                               on_failure=recorder.on_failure, start_soon=nursery.start_soon,
                               **kwargs)
        with trio.fail_after(GUARD_S):
            await engine.start()
        try:
            yield engine
        finally:
            with trio.fail_after(GUARD_S):
                await engine.close()


def is_running(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie has exited but is not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def is_reaped(pid: int) -> bool:
    """Whether our child `pid` is gone entirely: no process, no zombie."""
    try:
        os.kill(pid, 0)  # succeeds on a zombie too
    except ProcessLookupError:
        return True
    return False


# -- serving -------------------------------------------------------------------------


async def test_output_equals_the_in_process_engine(
        model_path: str, reference: dict[str, Any]) -> None:
    expected: Recorder = reference["recorder"]
    prompts = reference["prompts"]
    recorder = Recorder()
    async with open_process_engine(model_path, recorder) as engine:
        assert engine.pid is not None and is_running(engine.pid)
        engine.submit(seq(0, prompts[0]))
        await recorder.wait_finished(0)
        for i, ids in enumerate(prompts):
            engine.submit(seq(100 + i, ids))
        await recorder.wait_finished(*(100 + i for i in range(len(prompts))))
        # Heartbeats start with the Load (a standby worker is silent until adopted).
        await wait_until(lambda: engine.statistics().last_heartbeat_at is not None)
        stats = engine.statistics()
        await wait_until(lambda: engine.statistics().queued == 0)
    for seq_id in (0, *(100 + i for i in range(len(prompts)))):
        assert recorder.tokens[seq_id] == expected.tokens[seq_id], seq_id
        assert recorder.texts[seq_id] == expected.texts[seq_id], seq_id
        assert recorder.finish[seq_id] == expected.finish[seq_id] == "length"
    # The same steps, numbered alike: the first prefill and every token step.
    assert recorder.token_steps[0] == expected.token_steps[0]
    assert max(len(step.outputs) for step in recorder.steps) == len(prompts)
    assert [s.step for s in recorder.steps] == list(range(1, len(recorder.steps) + 1))
    assert stats.generation_tokens == (1 + len(prompts)) * MAX_TOKENS
    assert stats.steps == recorder.steps[-1].step
    assert stats.pid == engine.pid and stats.loaded
    assert stats.last_step_at is not None and stats.last_heartbeat_at is not None
    assert recorder.failures == []


async def test_cancel_tokenizer_calls_and_refusals(
        model_path: str, reference: dict[str, Any]) -> None:
    prompts = reference["prompts"]
    recorder = Recorder()
    async with open_process_engine(model_path, recorder) as engine:
        engine.submit(seq(1, prompts[0], max_tokens=500))
        await recorder.wait_for(lambda: len(recorder.tokens[1]) >= 3)
        engine.cancel(1)
        engine.cancel(12345)  # never submitted: nothing happens
        cancelled_at = len(recorder.tokens[1])
        engine.submit(seq(2, prompts[1], max_tokens=4))
        await recorder.wait_finished(2)

        assert await engine.tokenize(PROMPTS[1]) == prompts[1]
        fox = await engine.tokenize("fox")
        assert await engine.tokenize("fox", add_special_tokens=False) == fox[1:]
        assert await engine.detokenize(prompts[1][1:]) == reference["detokenized"]
        assert await engine.apply_chat_template(CHAT) == reference["chat"]
        assert await engine.apply_chat_template(CHAT, False) == reference["chat_open"]
        with pytest.raises(EngineClientError) as bad_role:
            await engine.apply_chat_template([{"role": "robot", "content": "x"}])
        assert bad_role.value.code is Code.TOKENIZER_ERROR
        with pytest.raises(EngineClientError) as bad_ids:
            await engine.detokenize([10**6])
        assert bad_ids.value.code is Code.TOKENIZER_ERROR
        for bad in (seq(3, [5], max_tokens=0), seq(4, []), seq(5, [5, 10**6]),
                    seq(6, [5], sampling=SamplingParams(top_p=0.0))):
            with pytest.raises(EngineClientError) as refused:
                engine.submit(bad)
            assert refused.value.code is Code.INVALID_PARAMS
    assert 1 not in recorder.finish
    assert len(recorder.tokens[1]) <= cancelled_at + 2, "at most the steps in flight"
    assert recorder.tokens[2] == reference["recorder"].tokens[101][:4]
    assert recorder.failures == []


# -- crashes -------------------------------------------------------------------------


async def _crash(engine: ProcessEngine, how: str) -> None:
    assert engine.pid is not None
    if how == "kill -9":
        os.kill(engine.pid, signal.SIGKILL)
    else:
        engine.inject_fault(how)  # type: ignore[arg-type]


@pytest.mark.parametrize(("how", "returncode", "cause"), [
    ("kill -9", -signal.SIGKILL, "signalled"),
    ("segfault", -signal.SIGSEGV, "signalled"),
    ("exit", 3, "exited"),
    ("raise", 1, "engine"),
])
async def test_a_dead_worker_is_one_typed_failure_and_is_reaped(
        model_path: str, reference: dict[str, Any], how: str, returncode: int,
        cause: str) -> None:
    recorder = Recorder()
    async with open_process_engine(model_path, recorder) as engine:
        pid = engine.pid
        assert pid is not None
        engine.submit(seq(1, reference["prompts"][0], max_tokens=10_000))
        await recorder.wait_for(lambda: len(recorder.tokens[1]) >= 2)
        await _crash(engine, how)
        await recorder.wait_for(lambda: bool(recorder.failures), PROMPTLY_S)
        await wait_until(lambda: is_reaped(pid))
        assert not engine.statistics().loaded
        with pytest.raises(EngineClientError) as refused:
            engine.submit(seq(2, [5]))
        assert refused.value.code is Code.MODEL_NOT_LOADED
        with pytest.raises(EngineClientError):
            await engine.tokenize("hello")
        engine.cancel(1)  # does nothing, raises nothing
    [failure] = recorder.failures
    assert isinstance(failure, WorkerExitedError)
    assert (failure.pid, failure.returncode, failure.cause) == (pid, returncode, cause)
    assert failure.code is Code.GENERATION_ERROR and failure.retryable
    if how == "raise":
        assert failure.engine_error is not None
        assert "injected engine fault" in failure.engine_error
    assert 1 not in recorder.finish


async def test_a_silent_worker_is_killed(model_path: str, reference: dict[str, Any]) -> None:
    recorder = Recorder()
    async with open_process_engine(model_path, recorder) as engine:
        pid = engine.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # frozen: no step, no heartbeat
        with trio.fail_after(PROMPTLY_S):
            await recorder.wait_for(lambda: bool(recorder.failures))
        await wait_until(lambda: is_reaped(pid))
    [failure] = recorder.failures
    assert isinstance(failure, WorkerExitedError)
    assert failure.cause == "silent"
    assert failure.returncode == -signal.SIGKILL


async def test_a_hung_engine_keeps_heartbeating_with_a_stale_last_step(
        model_path: str, reference: dict[str, Any]) -> None:
    """A hang inside the engine thread is the model actor's watchdog's to see."""
    recorder = Recorder()
    async with open_process_engine(model_path, recorder) as engine:
        engine.submit(seq(1, reference["prompts"][0], max_tokens=10_000))
        await recorder.wait_for(lambda: len(recorder.tokens[1]) >= 2)
        engine.inject_fault("hang")
        await trio.sleep(0.3)
        before = engine.statistics()
        await trio.sleep(6 * HEARTBEAT_MS / 1000)  # past the silence limit
        after = engine.statistics()
        assert after.steps == before.steps, "no step while hung"
        assert after.last_step_at == before.last_step_at
        assert after.last_heartbeat_at is not None and before.last_heartbeat_at is not None
        assert after.last_heartbeat_at > before.last_heartbeat_at, "still heartbeating"
        assert after.active == 1 and after.loaded
        pid = engine.pid
        assert pid is not None
    assert is_reaped(pid), "close released the hang, and the worker exited"
    assert recorder.failures == []


# -- shutdown and no process left ----------------------------------------------------


async def test_close_and_close_nowait_leave_no_process(
        model_path: str, reference: dict[str, Any]) -> None:
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        never_started = ProcessEngine(EngineSettings(model_path), on_step=recorder.on_step,
                                      on_failure=recorder.on_failure,
                                      start_soon=nursery.start_soon)
        await never_started.close()
        never_started.close_nowait()
        assert never_started.pid is None

    async with open_process_engine(model_path, recorder) as engine:
        engine.submit(seq(1, reference["prompts"][0], max_tokens=10_000))
        await recorder.wait_for(lambda: len(recorder.tokens[1]) >= 2)
        await engine.close()
        seen = len(recorder.steps)
        await engine.close()
        pid = engine.pid
        assert pid is not None and is_reaped(pid)
        await trio.sleep(0.2)
        assert len(recorder.steps) == seen, "no step after close returned"
        with pytest.raises(EngineClientError) as refused:
            await engine.detokenize([5])
        assert refused.value.code is Code.MODEL_NOT_LOADED

    async with trio.open_nursery() as nursery:
        engine = ProcessEngine(EngineSettings(model_path), on_step=recorder.on_step,
                               on_failure=recorder.on_failure, start_soon=nursery.start_soon,
                               heartbeat_interval_ms=HEARTBEAT_MS)
        with trio.fail_after(GUARD_S):
            await engine.start()
        engine.submit(seq(2, reference["prompts"][0], max_tokens=10_000))
        await recorder.wait_for(lambda: len(recorder.tokens[2]) >= 2)
        engine.close_nowait()  # synchronous: the reader task reaps
        pid = engine.pid
        assert pid is not None
    assert is_reaped(pid)
    assert recorder.failures == []


async def test_a_cancelled_owner_kills_and_reaps_its_worker(model_path: str) -> None:
    recorder = Recorder()
    with trio.move_on_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            engine = ProcessEngine(EngineSettings(model_path), on_step=recorder.on_step,
                                   on_failure=recorder.on_failure,
                                   start_soon=nursery.start_soon)
            await engine.start()
            pid = engine.pid
            assert pid is not None and is_running(pid)
            nursery.cancel_scope.cancel()
    assert is_reaped(pid)

    async with trio.open_nursery() as nursery:
        loading = ProcessEngine(EngineSettings(model_path), on_step=recorder.on_step,
                                on_failure=recorder.on_failure, start_soon=nursery.start_soon)
        with trio.move_on_after(0.5) as scope:  # before the worker has loaded the model
            await loading.start()
        assert scope.cancelled_caught
        assert loading.pid is not None and is_reaped(loading.pid)
    assert recorder.failures == []


async def test_startup_failures_are_model_load_errors(tmp_path: Path) -> None:
    recorder = Recorder()
    true = shutil.which("true")
    assert true is not None
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, str(tmp_path)),  # LoadFailed: not a model directory
        ({"startup_timeout_ms": 50}, "did not load it within"),
        ({"python_executable": true}, "exited with status 0 while starting"),
    ]
    async with trio.open_nursery() as nursery:
        for kwargs, text in cases:
            engine = ProcessEngine(EngineSettings(str(tmp_path)), on_step=recorder.on_step,
                                   on_failure=recorder.on_failure,
                                   start_soon=nursery.start_soon, **kwargs)
            with trio.fail_after(GUARD_S), pytest.raises(EngineClientError) as failed:
                await engine.start()
            assert failed.value.code is Code.MODEL_LOAD_ERROR
            assert text in failed.value.message
            assert engine.pid is not None and is_reaped(engine.pid)
            with pytest.raises(EngineClientError):
                engine.submit(seq(1, [5]))
            await engine.close()
    assert recorder.failures == []


# -- the worker on its own: handshake, parent death, end of stdin --------------------


async def test_worker_outlives_its_spawning_thread_and_exits_at_end_of_stdin(
        model_path: str) -> None:
    """Linux sends the parent-death signal when the spawning *thread* exits; trio spawns
    from cached threads that do. The worker must tell that from its parent's death.
    (Heartbeats begin with the Load: a standby worker is silent until adopted.)"""
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn() -> None:
        spawned.append(subprocess.Popen(
            [sys.executable, "-m", "corral.engine.worker", "--heartbeat-ms", str(HEARTBEAT_MS),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    thread = threading.Thread(target=spawn)
    thread.start()
    thread.join()  # the spawning thread is gone now
    [worker] = spawned
    assert worker.stdin is not None and worker.stdout is not None
    stdout = trio.lowlevel.FdStream(os.dup(worker.stdout.fileno()))
    reader = FrameReader()
    decode = Decoder(FromWorker).decode
    frames: list[Any] = []

    async def until(condition: Callable[[], bool]) -> None:
        with trio.fail_after(GUARD_S):
            while not condition():
                data = await stdout.receive_some(65536)
                assert data, "the worker exited"
                frames.extend(decode(p) for p in reader.feed(data))

    try:
        await until(lambda: len(frames) >= 1)
        assert frames[0] == Hello(worker.pid, PROTOCOL_VERSION)
        worker.stdin.write(frame(encode(Load(EngineSettings(model_path)))))
        worker.stdin.flush()
        # The thread's exit signalled the worker when it started; it is still here.
        await until(lambda: sum(isinstance(f, Heartbeat) for f in frames) >= 3)
        assert worker.poll() is None
        worker.stdin.close()  # the parent gives up: the worker exits at once
        with trio.fail_after(PROMPTLY_S):
            assert await trio.to_thread.run_sync(worker.wait) == 0
    finally:
        worker.kill()
        worker.wait()
        await stdout.aclose()
        worker.stdout.close()


_PARENT = textwrap.dedent("""
    import sys, trio
    from corral.engine.api import EngineSettings
    from corral.engine.process import ProcessEngine

    async def main():
        async with trio.open_nursery() as nursery:
            engine = ProcessEngine(EngineSettings(sys.argv[1]), on_step=lambda s: None,
                                   on_failure=lambda e: None, start_soon=nursery.start_soon)
            await engine.start()
            print(engine.pid, flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")


async def test_a_worker_dies_with_its_parent(model_path: str) -> None:
    parent = await trio.lowlevel.open_process(
        [sys.executable, "-c", _PARENT, model_path], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        line = b""
        with trio.fail_after(GUARD_S):
            while not line.endswith(b"\n"):
                chunk = await parent.stdout.receive_some(64)
                assert chunk, "the parent exited"
                line += chunk
        worker_pid = int(line)
        assert is_running(worker_pid)
        parent.kill()  # no cleanup code runs in the parent
        await parent.wait()
        await wait_until(lambda: not is_running(worker_pid))
    finally:
        parent.kill()
        await parent.wait()
        assert parent.stdout is not None
        await parent.stdout.aclose()
