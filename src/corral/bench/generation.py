"""`corral bench generation`: decoding through the runtime against raw mlx_lm, one run.

Three figures on the tiny model (benchmarks/README.md):
- single-stream decode tokens/s through `Runtime.generate`, as a ratio to
  `mlx_lm.stream_generate` on the same prompt and max_tokens (goal >= 0.95), and, to
  tell the engine's cost from mlx_lm's, to a bare `BatchGenerator` loop of that one
  prompt (the generator the engine steps);
- 16 concurrent streams through the runtime, tokens/s as a ratio to a bare
  `BatchGenerator` loop given the same 16 prompts (goal >= 0.95);
- time to first token of a late joiner: with 15 streams decoding, a 16th starts; the
  engine steps from the one that ends its prefill to the one that returns its first
  token (goal <= 1), and whether the 15 others got a token in every step meanwhile;
- structured output: single-stream decode tokens/s of a `json_schema` request (a list
  of records, greedy) as a ratio to the unconstrained single stream of the same round
  (goal >= 0.8): what the grammar's mask costs per token.
Rounds alternate reference and runtime, so drift hits both; figures are medians. The
references run in one dedicated thread of their own, never in trio's thread or a pooled
one (MLX streams are thread-local); the runtime's engine has its own thread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio
from rich.progress import Progress

from corral.bench import aio_generation
from corral.bench.report import goal, percentile, print_table, write_result
from corral.bench.runners import (
    ALIAS,
    BATCH_PROMPTS,
    PROMPT,
    ReferenceThread,
    Run,
    bench_model,
    raw_batch,
    raw_single,
    runtime_batch,
    runtime_single,
)
from corral.config import config_from_mapping
from corral.protocol.messages import EngineStep
from corral.runtime import Runtime, open_runtime

_BACKGROUND_MAX_TOKENS = 1500  # more than a join takes; the streams are cancelled after
_STRUCTURED_MAX_TOKENS = 1500  # more than the records take; they end where the grammar does


def _records_format(records: int) -> dict[str, Any]:
    """A json_schema response format for exactly `records` small records."""
    record = {"type": "object", "additionalProperties": False,
              "required": ["name", "age", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "tags": {"type": "array", "maxItems": 3,
                                      "items": {"enum": ["red", "green", "blue"]}}}}
    schema = {"type": "array", "minItems": records, "maxItems": records, "items": record}
    return {"type": "json_schema",
            "json_schema": {"name": "records", "schema": schema, "strict": True}}


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

        remove = rt.add_step_listener(ALIAS, record)
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
        async with rt.generate(ALIAS, prompt, max_tokens=_BACKGROUND_MAX_TOKENS) as stream:
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
            async with rt.generate(ALIAS, joiner, max_tokens=4) as stream:
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
               rounds: int, joins: int, warm_steps: int, records: int) -> dict[str, Any]:
    config = config_from_mapping({"stream_registry": {"max_active_streams": 2 * streams}})
    gen = config.generation
    single_raw: list[Run] = []
    single_bare: list[Run] = []
    single_rt: list[Run] = []
    structured_rt: list[Run] = []
    structured = _records_format(records)
    batch_raw: list[Run] = []
    batch_rt: list[Run] = []
    joined: list[_Join] = []
    reference = ReferenceThread(path)
    with reference.running(), Progress(transient=True) as progress:
        async with open_runtime(config, models={ALIAS: path}) as rt:
            prompts = [await rt.tokenize(ALIAS, p) for p in BATCH_PROMPTS[:streams]]
            sizes = (gen.completion_batch_size, gen.prefill_batch_size, gen.prefill_step_size)
            single = raw_single(PROMPT, max_tokens)
            single_batch = raw_batch([await rt.tokenize(ALIAS, PROMPT)], max_tokens, *sizes)
            batch = raw_batch(prompts, batch_max_tokens, *sizes)
            # Warm both sides up: first calls compile kernels and allocate caches.
            await reference.run(single)
            await reference.run(single_batch)
            await runtime_single(rt, PROMPT, max_tokens)
            await runtime_single(rt, PROMPT, _STRUCTURED_MAX_TOKENS, response_format=structured)
            await reference.run(batch)
            await runtime_batch(rt, prompts, batch_max_tokens)
            task = progress.add_task("single stream / batch rounds", total=rounds)
            for _ in range(rounds):
                single_raw.append(await reference.run(single))
                single_bare.append(await reference.run(single_batch))
                single_rt.append(await runtime_single(rt, PROMPT, max_tokens))
                structured_rt.append(await runtime_single(
                    rt, PROMPT, _STRUCTURED_MAX_TOKENS, response_format=structured))
                batch_raw.append(await reference.run(batch))
                batch_rt.append(await runtime_batch(rt, prompts, batch_max_tokens))
                progress.advance(task)
            task = progress.add_task("late joiner", total=joins)
            for _ in range(joins):
                joined.append(await _late_joiner(rt, prompts, warm_steps))
                progress.advance(task)

    def median(runs: list[Run], rate: str) -> float:
        return float(statistics.median(getattr(r, rate) for r in runs))

    def ratio(corral: list[Run], raw: list[Run], rate: str) -> float:
        return float(statistics.median(getattr(c, rate) / getattr(r, rate)
                                       for c, r in zip(corral, raw, strict=True)))

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
        "structured_decode_tokens_per_s": median(structured_rt, "decode_tokens_per_s"),
        "structured_decode_ratio": ratio(structured_rt, single_rt, "decode_tokens_per_s"),
        "structured_tokens": [r.tokens for r in structured_rt],
        "late_join_steps_prefill_to_first_token_p50": percentile(join_steps, 50),
        "late_join_steps_prefill_to_first_token_max": max(join_steps),
        "late_join_steps_open_to_first_token_p50":
            percentile([j.steps_open_to_first_token for j in joined], 50),
        "late_join_ttft_ms_p50": percentile([j.ttft_ms for j in joined], 50),
        "late_join_others_missed_tokens": sum(j.others_missed_tokens for j in joined),
    }


def main(smoke: bool = False, output_dir: Path | None = None,
         model: str | None = None) -> dict[str, Any]:
    """Run the generation benchmark on the tiny model (or `model`, with fewer tokens and
    rounds, and without the asyncio part), print its table and write
    ``generation.json`` (``generation-<model>.json``)."""
    path, suffix = bench_model(model)
    parameters: dict[str, Any] = (
        {"max_tokens": 32, "streams": 4, "batch_max_tokens": 16, "rounds": 1, "joins": 1,
         "warm_steps": 2, "records": 2} if smoke else
        {"max_tokens": 48, "streams": 8, "batch_max_tokens": 24, "rounds": 3, "joins": 3,
         "warm_steps": 4, "records": 4} if model is not None else
        {"max_tokens": 256, "streams": 16, "batch_max_tokens": 128, "rounds": 7, "joins": 7,
         "warm_steps": 8, "records": 8})
    results = trio.run(lambda: _run(path, **parameters))
    if model is None:
        results.update(aio_generation.measure(path, smoke=smoke))
    goals = [goal("single_decode_ratio", results["single_decode_ratio"], ">=", 0.95),
             goal("batch_ratio", results["batch_ratio"], ">=", 0.95),
             goal("structured_decode_ratio", results["structured_decode_ratio"], ">=", 0.8),
             goal("late_join_steps_prefill_to_first_token",
                  results["late_join_steps_prefill_to_first_token_max"], "<=", 1),
             *(aio_generation.goals(results) if model is None else [])]
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
        ("json_schema decode tokens/s, vs unconstrained (corral)",
         results["structured_decode_tokens_per_s"], results["single_decode_tokens_per_s"],
         results["structured_decode_ratio"]),
        ("late joiner: steps prefill → first token (p50)",
         results["late_join_steps_prefill_to_first_token_p50"], "-", "-"),
        ("late joiner: steps open → first token (p50)",
         results["late_join_steps_open_to_first_token_p50"], "-", "-"),
        ("late joiner: TTFT ms (p50)", results["late_join_ttft_ms_p50"], "-", "-"),
        ("late joiner: tokens the others missed", results["late_join_others_missed_tokens"],
         "-", "-"),
        *(aio_generation.rows(results) if model is None else []),
    ], goals)
    write_result(f"generation{suffix}", {
        **parameters, "smoke": smoke, "model": path, "prompt": PROMPT,
        "statistic": "median over rounds; reference and runtime rounds alternate; ratio "
                     "of each round's pair",
        "decode": "tokens after the first read over the time after it",
        "clock": "wall clock (time.perf_counter)"}, results, goals, directory=output_dir,
        smoke=smoke)
    return results
