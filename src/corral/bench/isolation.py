"""`corral bench isolation`: the engine in a worker process against the engine thread.

Two figures (benchmarks/README.md):
- decode throughput with `process` isolation as a ratio to `thread` isolation: total
  generated tokens per second for N concurrent greedy sequences on the tiny model,
  both engines loaded once, rounds alternating between them so drift hits both, the
  ratio taken per pair of rounds (goal >= 0.95);
- worker restart latency p50/p99: from SIGKILL of a loaded worker to its replacement's
  Hello, which is when a new worker is ready for its model; the model's load (mlx_lm's
  import and `mlx_lm.load`) is reported apart. How fast the death is noticed is part of
  the figure and is also reported on its own.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from rich.progress import Progress

from corral.bench.report import PROMPTS, goal, percentile, print_table, write_result
from corral.engine.api import EngineSettings
from corral.engine.process import ProcessEngine
from corral.engine.thread import Engine
from corral.protocol.messages import EngineSequence, EngineStep, ModelInfo, SamplingParams
from corral.tiny import make_tiny_model

_PROMPTS = PROMPTS
_GUARD_S = 300.0  # only against a hang


class _Counter:
    """Counts generated tokens and finished sequences of one round."""

    def __init__(self) -> None:
        self.tokens = 0
        self.finished = 0
        self.target = 0
        self.done = trio.Event()
        self.failure: BaseException | None = None

    def reset(self, target: int) -> None:
        self.tokens, self.finished, self.target = 0, 0, target
        self.done = trio.Event()

    def on_step(self, step: EngineStep) -> None:
        self.tokens += len(step.outputs)
        for out in step.outputs:
            if out.finish_reason is not None:
                self.finished += 1
        if self.finished >= self.target:
            self.done.set()

    def on_failure(self, error: BaseException) -> None:
        self.failure = error
        self.done.set()


async def _round(engine: Engine | ProcessEngine, counter: _Counter, prompts: list[list[int]],
                 max_tokens: int, first_id: int) -> tuple[int, float]:
    """Decode every prompt at once; return (tokens generated, seconds)."""
    counter.reset(len(prompts))
    began = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.submit(EngineSequence(first_id + i, ids, SamplingParams(max_tokens=max_tokens)))
    with trio.fail_after(_GUARD_S):
        await counter.done.wait()
    elapsed = time.perf_counter() - began
    if counter.failure is not None:
        raise RuntimeError(f"the engine failed during the benchmark: {counter.failure!r}")
    return counter.tokens, elapsed


async def _throughput(path: str, concurrency: int, max_tokens: int, rounds: int,
                      progress: Progress) -> dict[str, Any]:
    thread_counter, process_counter = _Counter(), _Counter()
    thread_tps: list[float] = []
    process_tps: list[float] = []
    tokens_per_round: set[int] = set()
    task = progress.add_task("decode rounds (thread / process)", total=rounds)
    async with trio.open_nursery() as nursery:
        thread = Engine(EngineSettings(path), on_step=thread_counter.on_step,
                        on_failure=thread_counter.on_failure)
        process = ProcessEngine(EngineSettings(path), on_step=process_counter.on_step,
                                on_failure=process_counter.on_failure,
                                start_soon=nursery.start_soon)
        try:
            with trio.fail_after(_GUARD_S):
                await thread.start()
                await process.start()
            texts = [_PROMPTS[i % len(_PROMPTS)] for i in range(concurrency)]
            prompts = [await thread.tokenize(text) for text in texts]
            # One unmeasured round each: first calls compile and allocate.
            await _round(thread, thread_counter, prompts, max_tokens, 0)
            await _round(process, process_counter, prompts, max_tokens, 0)
            for r in range(rounds):
                first_id = (r + 1) * concurrency
                engines: list[tuple[Engine | ProcessEngine, _Counter, list[float]]] = [
                    (thread, thread_counter, thread_tps), (process, process_counter, process_tps)]
                for engine, counter, rates in engines if r % 2 == 0 else engines[::-1]:
                    tokens, seconds = await _round(engine, counter, prompts, max_tokens,
                                                   first_id)
                    tokens_per_round.add(tokens)
                    rates.append(tokens / seconds)
                progress.advance(task)
        finally:
            with trio.CancelScope(shield=True):
                await thread.close()
                await process.close()
    if len(tokens_per_round) != 1:
        raise RuntimeError(f"the engines generated different token counts: {tokens_per_round}")
    return {
        "thread_tokens_per_s": statistics.median(thread_tps),
        "process_tokens_per_s": statistics.median(process_tps),
        "throughput_ratio": statistics.median(
            p / t for p, t in zip(process_tps, thread_tps, strict=True)),
        "tokens_per_round": tokens_per_round.pop(),
    }


async def _restarts(path: str, count: int, progress: Progress) -> dict[str, Any]:
    """Kill a loaded worker `count` times; time each replacement's Hello and load."""
    to_hello: list[float] = []
    to_notice: list[float] = []
    to_loaded: list[float] = []
    load_seconds: list[float] = []
    task = progress.add_task("worker restarts", total=count)

    async with trio.open_nursery() as nursery:

        async def loaded_worker(died: trio.Event) -> tuple[ProcessEngine, ModelInfo]:
            engine = ProcessEngine(EngineSettings(path), on_step=lambda step: None,
                                   on_failure=lambda error: died.set(),
                                   start_soon=nursery.start_soon)
            with trio.fail_after(_GUARD_S):
                return engine, await engine.start()

        died = trio.Event()
        victim, _ = await loaded_worker(died)
        for _ in range(count):
            pid = victim.pid
            assert pid is not None
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(_GUARD_S):
                await died.wait()
            noticed_at = time.monotonic()
            await victim.close()
            died = trio.Event()
            victim, info = await loaded_worker(died)
            loaded_at = time.monotonic()
            hello_at = victim.statistics().hello_at
            assert hello_at is not None
            to_notice.append(noticed_at - killed_at)
            to_hello.append(hello_at - killed_at)
            to_loaded.append(loaded_at - killed_at)
            load_seconds.append(info.load_seconds)
            progress.advance(task)
        await victim.close()
    return {
        "restart_p50_ms": percentile(to_hello, 50) * 1e3,
        "restart_p99_ms": percentile(to_hello, 99) * 1e3,
        "death_noticed_p50_ms": percentile(to_notice, 50) * 1e3,
        "death_noticed_p99_ms": percentile(to_notice, 99) * 1e3,
        "restart_to_loaded_p50_ms": percentile(to_loaded, 50) * 1e3,
        "restart_to_loaded_p99_ms": percentile(to_loaded, 99) * 1e3,
        "mlx_lm_load_p50_ms": percentile(load_seconds, 50) * 1e3,
        "restarts_measured": len(to_hello),
    }


async def _run(path: str, concurrency: int, max_tokens: int, rounds: int,
               restarts: int) -> dict[str, Any]:
    with Progress(transient=True) as progress:
        results = await _throughput(path, concurrency, max_tokens, rounds, progress)
        results.update(await _restarts(path, restarts, progress))
    return results


def main(smoke: bool = False, output_dir: Path | None = None) -> dict[str, Any]:
    """Run the isolation benchmark, print its table and write ``isolation.json``."""
    parameters = ({"concurrency": 8, "max_tokens": 16, "rounds": 2, "restarts": 3} if smoke
                  else {"concurrency": 8, "max_tokens": 64, "rounds": 20, "restarts": 20})
    with tempfile.TemporaryDirectory(prefix="corral-bench-isolation-") as directory:
        path = str(make_tiny_model(Path(directory) / "tiny"))
        results = trio.run(lambda: _run(path, **parameters))
    goals = [goal("throughput_ratio", results["throughput_ratio"], ">=", 0.95)]
    print_table("corral bench isolation", ["figure", "process", "thread", "ratio"], [
        ("decode tokens/s", results["process_tokens_per_s"], results["thread_tokens_per_s"],
         results["throughput_ratio"]),
        *((f"{label}, ms p50 / p99", _pair(results, key), "-", "-") for label, key in (
            ("restart to Hello", "restart"),
            ("death noticed", "death_noticed"),
            ("restart to loaded", "restart_to_loaded"))),
    ], goals)
    write_result("isolation", {**parameters, "model": "tiny", "smoke": smoke}, results, goals,
                 directory=output_dir, smoke=smoke)
    return results


def _pair(results: dict[str, Any], key: str) -> str:
    return f"{results[key + '_p50_ms']:,.1f} / {results[key + '_p99_ms']:,.1f}"
