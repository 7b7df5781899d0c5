"""`corral bench generation`: decoding through the runtime against raw mlx_lm, one run.

Three figures on the tiny model (DESIGN.md "How to measure"):
- single-stream decode tokens/s through `Runtime.generate`, as a ratio to
  `mlx_lm.stream_generate` on the same prompt and max_tokens (goal >= 0.95), and, to
  tell the engine's cost from mlx_lm's, to a bare `BatchGenerator` loop of that one
  prompt (the generator the engine steps);
- 16 concurrent streams through the runtime, tokens/s as a ratio to a bare
  `BatchGenerator` loop given the same 16 prompts (goal >= 0.95);
- time to first token of a late joiner: with 15 streams decoding, a 16th starts; the
  engine steps from the one that ends its prefill to the one that returns its first
  token (goal <= 1), and whether the 15 others got a token in every step meanwhile.
Rounds alternate reference and runtime, so drift hits both; figures are medians. The
references run in one dedicated thread of their own, never in trio's thread or a pooled
one (MLX streams are thread-local); the runtime's engine has its own thread.
"""

from __future__ import annotations

import concurrent.futures
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio
from rich.progress import Progress

from corral.bench.report import PROMPTS, goal, percentile, print_table, write_result
from corral.config import config_from_mapping
from corral.protocol.messages import EngineStep
from corral.runtime import Runtime, open_runtime
from corral.tiny import default_model_path

_ALIAS = "tiny"
_PROMPT = "The quick brown fox"
_BACKGROUND_MAX_TOKENS = 4000  # more than a join takes; the streams are cancelled after
_BATCH_PROMPTS = PROMPTS


class _Run(msgspec.Struct, frozen=True):
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


class _ReferenceThread:
    """A dedicated OS thread that loads the model once and runs raw mlx_lm jobs.

    A job is `fn(model, tokenizer, stream)`, where `stream` is an MLX stream made in this
    thread. The trio side waits for a job's result in a pooled thread that only blocks on
    a future and never touches MLX.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], concurrent.futures.Future[Any]]
                                      | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="corral-bench-reference",
                                        daemon=True)

    @contextmanager
    def running(self) -> Iterator[_ReferenceThread]:
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
        import mlx.core as mx
        import mlx_lm

        loaded: tuple[Any, ...] | BaseException
        try:
            model, tokenizer = mlx_lm.load(self._path)[:2]
            loaded = (model, tokenizer, mx.new_stream(mx.default_device()))
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


def _raw_single(prompt: str, max_tokens: int) -> Callable[..., _Run]:
    def run(model: Any, tokenizer: Any, stream: Any) -> _Run:
        import mlx_lm

        tokens = 0
        started = first = time.perf_counter()
        for _ in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            tokens += 1
            if tokens == 1:
                first = time.perf_counter()
        return _Run(tokens, 1, started, first, time.perf_counter())

    return run


def _raw_batch(prompts: list[list[int]], max_tokens: int, completion_batch_size: int,
               prefill_batch_size: int, prefill_step_size: int) -> Callable[..., _Run]:
    """Insert every prompt into a bare BatchGenerator and call next() until all finish:
    the engine's generator with the engine's batch sizes and stop tokens, and nothing else."""

    def run(model: Any, tokenizer: Any, stream: Any) -> _Run:
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
            return _Run(tokens, first_tokens, started, first, time.perf_counter())
        finally:
            generator.close()

    return run


# -- the runtime ----------------------------------------------------------------------


async def _runtime_single(rt: Runtime, prompt: str, max_tokens: int) -> _Run:
    tokens = first_tokens = 0
    started = first = time.perf_counter()
    async with rt.generate(_ALIAS, prompt, max_tokens=max_tokens) as stream:
        async for chunk in stream:
            if not tokens:
                first, first_tokens = time.perf_counter(), len(chunk.token_ids)
            tokens += len(chunk.token_ids)
    return _Run(tokens, first_tokens, started, first, time.perf_counter())


async def _runtime_batch(rt: Runtime, prompts: list[list[int]], max_tokens: int) -> _Run:
    counts = [0]
    firsts: list[tuple[float, int]] = []
    started = time.perf_counter()

    async def one(prompt: list[int]) -> None:
        async with rt.generate(_ALIAS, prompt, max_tokens=max_tokens) as stream:
            async for chunk in stream:
                if not counts[0]:
                    firsts.append((time.perf_counter(), len(chunk.token_ids)))
                counts[0] += len(chunk.token_ids)

    async with trio.open_nursery() as nursery:
        for prompt in prompts:
            nursery.start_soon(one, prompt)
    first, first_tokens = firsts[0]
    return _Run(counts[0], first_tokens, started, first, time.perf_counter())


class _StepTap:
    """Every step the model's engine posts, with its `prefilled` list (which the
    registry's `ModelOutput` does not carry), through the runtime's step listener."""

    def __init__(self) -> None:
        self.steps: list[EngineStep] = []
        self.changed = trio.Event()

    @contextmanager
    def attached(self, rt: Runtime) -> Iterator[_StepTap]:
        def record(step: EngineStep) -> None:
            self.steps.append(step)
            self.changed.set()
            self.changed = trio.Event()

        remove = rt.add_step_listener(_ALIAS, record)
        try:
            yield self
        finally:
            remove()

    @property
    def last_step(self) -> int:
        return self.steps[-1].step if self.steps else 0

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()

    def prefilled_at(self, seq_id: int) -> int | None:
        return next((s.step for s in self.steps if seq_id in s.prefilled), None)

    def first_token_at(self, seq_id: int) -> int | None:
        return next((s.step for s in self.steps
                     if any(o.seq_id == seq_id for o in s.outputs)), None)


class _Join(msgspec.Struct, frozen=True):
    steps_prefill_to_first_token: int
    steps_open_to_first_token: int
    ttft_ms: float
    others_missed_tokens: int


async def _late_joiner(rt: Runtime, prompts: list[list[int]], warm_steps: int) -> _Join:
    """With len(prompts) - 1 streams decoding, open the last one; count engine steps.

    `steps_open_to_first_token` counts from the last step the trio side had seen when it
    opened the stream, so it may count a step or two the engine had not posted yet.
    `others_missed_tokens` counts (step, stream) pairs, from the joiner's opening to its
    first token, in which a stream still decoding got no token: 0 means the join stalled
    none.
    """
    *decoding, joiner = prompts
    tap = _StepTap()
    ids: list[int] = []

    async def background(prompt: list[int]) -> None:
        async with rt.generate(_ALIAS, prompt, max_tokens=_BACKGROUND_MAX_TOKENS) as stream:
            ids.append(stream.stream_id)
            async for _ in stream:
                pass

    with tap.attached(rt):
        async with trio.open_nursery() as nursery:
            for prompt in decoding:
                nursery.start_soon(background, prompt)

            def all_decoding() -> bool:
                full = [s for s in tap.steps if len(s.outputs) == len(decoding)]
                return len(ids) == len(decoding) and len(full) >= warm_steps

            await tap.wait_for(all_decoding)
            opened_at = tap.last_step
            started = time.perf_counter()
            ttft = float("nan")
            async with rt.generate(_ALIAS, joiner, max_tokens=4) as stream:
                async for _ in stream:
                    ttft = time.perf_counter() - started
                    break
                joiner_id = stream.stream_id
            nursery.cancel_scope.cancel()
    prefilled, first = tap.prefilled_at(joiner_id), tap.first_token_at(joiner_id)
    assert prefilled is not None and first is not None, "the joiner was never seen"
    ended = {o.seq_id: s.step for s in tap.steps for o in s.outputs if o.finish_reason}
    missed = sum(1 for s in tap.steps if opened_at < s.step <= first
                 for seq_id in ids if s.step <= ended.get(seq_id, first)
                 and seq_id not in {o.seq_id for o in s.outputs})
    return _Join(first - prefilled, first - opened_at, ttft * 1e3, missed)


# -- the run --------------------------------------------------------------------------


async def _run(path: str, max_tokens: int, streams: int, batch_max_tokens: int,
               rounds: int, joins: int, warm_steps: int) -> dict[str, Any]:
    config = config_from_mapping({"stream_registry": {"max_active_streams": 2 * streams}})
    gen = config.generation
    single_raw: list[_Run] = []
    single_bare: list[_Run] = []
    single_rt: list[_Run] = []
    batch_raw: list[_Run] = []
    batch_rt: list[_Run] = []
    joined: list[_Join] = []
    reference = _ReferenceThread(path)
    with reference.running(), Progress(transient=True) as progress:
        async with open_runtime(config, models={_ALIAS: path}) as rt:
            prompts = [await rt.tokenize(_ALIAS, p) for p in _BATCH_PROMPTS[:streams]]
            sizes = (gen.completion_batch_size, gen.prefill_batch_size, gen.prefill_step_size)
            single = _raw_single(_PROMPT, max_tokens)
            single_batch = _raw_batch([await rt.tokenize(_ALIAS, _PROMPT)], max_tokens, *sizes)
            batch = _raw_batch(prompts, batch_max_tokens, *sizes)
            # Warm both sides up: first calls compile kernels and allocate caches.
            await reference.run(single)
            await reference.run(single_batch)
            await _runtime_single(rt, _PROMPT, max_tokens)
            await reference.run(batch)
            await _runtime_batch(rt, prompts, batch_max_tokens)
            task = progress.add_task("single stream / batch rounds", total=rounds)
            for _ in range(rounds):
                single_raw.append(await reference.run(single))
                single_bare.append(await reference.run(single_batch))
                single_rt.append(await _runtime_single(rt, _PROMPT, max_tokens))
                batch_raw.append(await reference.run(batch))
                batch_rt.append(await _runtime_batch(rt, prompts, batch_max_tokens))
                progress.advance(task)
            task = progress.add_task("late joiner", total=joins)
            for _ in range(joins):
                joined.append(await _late_joiner(rt, prompts, warm_steps))
                progress.advance(task)

    def median(runs: list[_Run], rate: str) -> float:
        return statistics.median(getattr(r, rate) for r in runs)

    def ratio(corral: list[_Run], raw: list[_Run], rate: str) -> float:
        return statistics.median(getattr(c, rate) / getattr(r, rate)
                                 for c, r in zip(corral, raw, strict=True))

    join_steps = [j.steps_prefill_to_first_token for j in joined]
    return {
        "single_decode_tokens_per_s": median(single_rt, "decode_tokens_per_s"),
        "single_raw_decode_tokens_per_s": median(single_raw, "decode_tokens_per_s"),
        "single_decode_ratio": ratio(single_rt, single_raw, "decode_tokens_per_s"),
        "single_bare_batch_generator_decode_tokens_per_s":
            median(single_bare, "decode_tokens_per_s"),
        "single_decode_ratio_to_bare_batch_generator":
            ratio(single_rt, single_bare, "decode_tokens_per_s"),
        "bare_batch_generator_to_stream_generate_decode_ratio":
            ratio(single_bare, single_raw, "decode_tokens_per_s"),
        "single_e2e_tokens_per_s": median(single_rt, "e2e_tokens_per_s"),
        "single_raw_e2e_tokens_per_s": median(single_raw, "e2e_tokens_per_s"),
        "single_e2e_ratio": ratio(single_rt, single_raw, "e2e_tokens_per_s"),
        "single_tokens": [r.tokens for r in single_rt],
        "single_raw_tokens": [r.tokens for r in single_raw],
        "batch_tokens_per_s": median(batch_rt, "e2e_tokens_per_s"),
        "batch_raw_tokens_per_s": median(batch_raw, "e2e_tokens_per_s"),
        "batch_ratio": ratio(batch_rt, batch_raw, "e2e_tokens_per_s"),
        "batch_decode_tokens_per_s": median(batch_rt, "decode_tokens_per_s"),
        "batch_raw_decode_tokens_per_s": median(batch_raw, "decode_tokens_per_s"),
        "batch_decode_ratio": ratio(batch_rt, batch_raw, "decode_tokens_per_s"),
        "batch_tokens": [r.tokens for r in batch_rt],
        "batch_raw_tokens": [r.tokens for r in batch_raw],
        "late_join_steps_prefill_to_first_token_p50": percentile(join_steps, 50),
        "late_join_steps_prefill_to_first_token_max": max(join_steps),
        "late_join_steps_open_to_first_token_p50":
            percentile([j.steps_open_to_first_token for j in joined], 50),
        "late_join_ttft_ms_p50": percentile([j.ttft_ms for j in joined], 50),
        "late_join_others_missed_tokens": sum(j.others_missed_tokens for j in joined),
    }


def main(smoke: bool = False, output_dir: Path | None = None) -> dict[str, Any]:
    """Run the generation benchmark, print its table and write ``generation.json``."""
    parameters: dict[str, Any] = (
        {"max_tokens": 32, "streams": 4, "batch_max_tokens": 16, "rounds": 1, "joins": 1,
         "warm_steps": 2} if smoke else
        {"max_tokens": 256, "streams": 16, "batch_max_tokens": 128, "rounds": 7, "joins": 7,
         "warm_steps": 8})
    # aio_generation builds on this module's runs, so it is imported here, not at the top.
    from corral.bench import aio_generation

    path = str(default_model_path())
    results = trio.run(lambda: _run(path, **parameters))
    results.update(aio_generation.measure(path, smoke=smoke))
    goals = [goal("single_decode_ratio", results["single_decode_ratio"], ">=", 0.95),
             goal("batch_ratio", results["batch_ratio"], ">=", 0.95),
             goal("late_join_steps_prefill_to_first_token",
                  results["late_join_steps_prefill_to_first_token_max"], "<=", 1),
             *aio_generation.goals(results)]
    print_table("corral bench generation", ["figure", "corral", "raw mlx_lm", "ratio"], [
        ("single stream decode tokens/s", results["single_decode_tokens_per_s"],
         results["single_raw_decode_tokens_per_s"], results["single_decode_ratio"]),
        ("single stream decode tokens/s, vs bare BatchGenerator",
         results["single_decode_tokens_per_s"],
         results["single_bare_batch_generator_decode_tokens_per_s"],
         results["single_decode_ratio_to_bare_batch_generator"]),
        ("single stream end-to-end tokens/s", results["single_e2e_tokens_per_s"],
         results["single_raw_e2e_tokens_per_s"], results["single_e2e_ratio"]),
        (f"{parameters['streams']} streams tokens/s", results["batch_tokens_per_s"],
         results["batch_raw_tokens_per_s"], results["batch_ratio"]),
        (f"{parameters['streams']} streams decode tokens/s",
         results["batch_decode_tokens_per_s"], results["batch_raw_decode_tokens_per_s"],
         results["batch_decode_ratio"]),
        ("late joiner: steps prefill → first token (p50)",
         results["late_join_steps_prefill_to_first_token_p50"], "-", "-"),
        ("late joiner: steps open → first token (p50)",
         results["late_join_steps_open_to_first_token_p50"], "-", "-"),
        ("late joiner: TTFT ms (p50)", results["late_join_ttft_ms_p50"], "-", "-"),
        ("late joiner: tokens the others missed", results["late_join_others_missed_tokens"],
         "-", "-"),
        *aio_generation.rows(results),
    ], goals)
    write_result("generation", {
        **parameters, "smoke": smoke, "model": path, "prompt": _PROMPT,
        "statistic": "median over rounds; reference and runtime rounds alternate; ratio "
                     "of each round's pair",
        "decode": "tokens after the first read over the time after it",
        "clock": "wall clock (time.perf_counter)"}, results, goals, directory=output_dir, smoke=smoke)
    return results
