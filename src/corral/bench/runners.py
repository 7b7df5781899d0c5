"""What the generation benches share: the prompts, a timed run, raw mlx_lm in a thread
of its own, and the same work through the runtime.

The references run in one dedicated thread (`ReferenceThread`), never in trio's thread
or a pooled one: MLX streams are thread-local. Nothing here decides a goal.
"""

from __future__ import annotations

import concurrent.futures
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import trio

from corral.bench.report import PROMPTS
from corral.runtime import Runtime
from corral.tiny import default_model_path

__all__ = [
    "ALIAS",
    "BATCH_PROMPTS",
    "PROMPT",
    "ReferenceThread",
    "Run",
    "Tally",
    "bench_model",
    "raw_batch",
    "raw_single",
    "runtime_batch",
    "runtime_single",
]

ALIAS = "tiny"
PROMPT = "The quick brown fox"
BATCH_PROMPTS = PROMPTS


def bench_model(model: str | None) -> tuple[str, str]:
    """The MLX directory a bench measures, and the suffix of its results file: the tiny
    model and "" when `model` is None; else the model `model` names, resolved as
    `corral serve --model` resolves it (a GGUF file or an Ollama name converted into the
    cache once), and "-" + a name made of it, so a run on a real model is recorded
    beside the tiny model's, never over it.

    Raises:
        EngineClientError: ModelLoadError when `model` leads to no model.
    """
    if model is None:
        return str(default_model_path()), ""
    from corral.engine.loaders import resolve_model

    name = model.removeprefix("ollama:").rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return resolve_model(model), "-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Run(msgspec.Struct, frozen=True):
    """One timed generation: tokens counted, and perf_counter times of its events.

    `first_tokens` is how many tokens the first read held (a runtime chunk may hold
    more than one); the decode rate counts the tokens after it, over the time after it.
    """

    tokens: int
    first_tokens: int
    started: float
    first: float
    ended: float

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - self.first_tokens) / (self.ended - self.first)

    @property
    def e2e_tokens_per_s(self) -> float:
        return self.tokens / (self.ended - self.started)


# -- the references: raw mlx_lm in a thread of their own ------------------------------


class ReferenceThread:
    """A dedicated OS thread that loads the model once and runs raw mlx_lm jobs.

    The model is loaded as the engine loads it (`corral.engine.loading.load_weights`,
    default settings: on a CPU device a quantized model in float32), so a reference
    computes with the weights the runtime serves. A job is `fn(model, tokenizer,
    stream)`, where `stream` is an MLX stream made in this thread. The trio side waits
    for a job's result in a pooled thread that only blocks on a future and never
    touches MLX.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], concurrent.futures.Future[Any]]
                                      | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="corral-bench-reference",
                                        daemon=True)

    @contextmanager
    def running(self) -> Iterator[ReferenceThread]:
        self._thread.start()
        try:
            yield self
        finally:
            self._jobs.put(None)
            self._thread.join()

    async def run(self, fn: Callable[..., Any]) -> Any:
        """Run `fn(model, tokenizer, stream)` in the reference thread; return its result."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return await trio.to_thread.run_sync(future.result)

    def _serve(self) -> None:
        from corral.engine.base import EngineSettings
        from corral.engine.loading import load_weights

        loaded: tuple[Any, ...] | BaseException
        try:
            weights = load_weights(EngineSettings(self._path))
            loaded = (weights.model, weights.tokenizer, weights.stream)
        except Exception as exc:  # every job gets it
            loaded = exc
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if isinstance(loaded, BaseException):
                future.set_exception(loaded)
                continue
            try:
                future.set_result(fn(*loaded))
            except Exception as exc:
                future.set_exception(exc)


def raw_single(prompt: str, max_tokens: int) -> Callable[..., Run]:
    def run(model: Any, tokenizer: Any, stream: Any) -> Run:
        import mlx_lm

        tokens = 0
        started = first = time.perf_counter()
        for _ in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            tokens += 1
            if tokens == 1:
                first = time.perf_counter()
        return Run(tokens, 1, started, first, time.perf_counter())

    return run


def raw_batch(prompts: list[list[int]], max_tokens: int, completion_batch_size: int,
               prefill_batch_size: int, prefill_step_size: int) -> Callable[..., Run]:
    """Insert every prompt into a bare BatchGenerator and call next() until all finish:
    the engine's generator with the engine's batch sizes and stop tokens, and nothing else."""

    def run(model: Any, tokenizer: Any, stream: Any) -> Run:
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(
            model, stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=completion_batch_size,
            prefill_batch_size=prefill_batch_size, prefill_step_size=prefill_step_size,
            stream=stream)
        try:
            started = first = time.perf_counter()
            live = set(generator.insert(prompts, max_tokens=[max_tokens] * len(prompts)))
            tokens = first_tokens = 0
            while live:
                _, responses = generator.next()
                if responses and not tokens:
                    first, first_tokens = time.perf_counter(), len(responses)
                tokens += len(responses)
                live -= {r.uid for r in responses if r.finish_reason is not None}
            return Run(tokens, first_tokens, started, first, time.perf_counter())
        finally:
            generator.close()

    return run


# -- the runtime ----------------------------------------------------------------------


class Tally:
    """Counts the tokens of one or more concurrent streams as their chunks arrive, and
    when the first came (with how many tokens it held); `run()` makes the `Run`."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.tokens = 0
        self.first: tuple[float, int] | None = None

    def add(self, token_ids: list[int]) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), len(token_ids))
        self.tokens += len(token_ids)

    def run(self) -> Run:
        first, first_tokens = self.first or (self.started, 0)
        return Run(self.tokens, first_tokens, self.started, first, time.perf_counter())


async def runtime_single(rt: Runtime, prompt: str, max_tokens: int, **params: Any) -> Run:
    """One stream through the runtime; `params` are more of `Runtime.generate`'s."""
    tally = Tally()
    async with rt.generate(ALIAS, prompt, max_tokens=max_tokens, **params) as stream:
        async for chunk in stream:
            tally.add(chunk.token_ids)
    return tally.run()


async def runtime_batch(rt: Runtime, prompts: list[list[int]], max_tokens: int) -> Run:
    tally = Tally()

    async def one(prompt: list[int]) -> None:
        async with rt.generate(ALIAS, prompt, max_tokens=max_tokens) as stream:
            async for chunk in stream:
                tally.add(chunk.token_ids)

    async with trio.open_nursery() as nursery:
        for prompt in prompts:
            nursery.start_soon(one, prompt)
    return tally.run()
