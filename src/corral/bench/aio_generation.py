"""Decoding through `corral.aio` against the trio facade, side by side in one process.

For `corral bench generation`: tokens/s of one stream and of N concurrent streams, read
chunk by chunk through `corral.aio` (the runtime as a trio guest on an asyncio loop)
as a ratio to the same reads through the trio facade under `trio.run` (goal >= 0.95).
Both runtimes load the same model and stay open for the whole run, rounds alternate
between them (and which goes first, ABBA) so drift hits both, and each figure is the
median over rounds of each round's ratio. The trio runtime runs in a thread of its own
(its own `trio.run`); the asyncio loop and its guest run keep the main thread. Only one
side decodes at a time. Each asyncio round also runs the trio side's code inside the
guest run (`run_in_trio`), which tells guest mode's own cost from the bridge's.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Self

import trio

from corral import aio
from corral.bench.report import Goal, goal
from corral.bench.runners import (
    ALIAS,
    BATCH_PROMPTS,
    PROMPT,
    Run,
    Tally,
    runtime_batch,
    runtime_single,
)
from corral.config import RuntimeConfig, config_from_mapping
from corral.runtime import Runtime, open_runtime

_SMOKE = {"max_tokens": 32, "streams": 8, "batch_max_tokens": 16, "rounds": 1}
_FULL = {"max_tokens": 256, "streams": 8, "batch_max_tokens": 128, "rounds": 10}


class _TrioSide:
    """The trio facade under `trio.run` in a dedicated thread, running jobs on request.

    A job is `fn(runtime)`, trio code; the asyncio side waits for its result in a pooled
    thread (`run_in_executor`), outside the timed region, which the job times itself.
    """

    def __init__(self, config: RuntimeConfig, path: str) -> None:
        self._config = config
        self._path = path
        self._token: trio.lowlevel.TrioToken | None = None
        self._runtime: Runtime | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="corral-bench-trio",
                                        daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()

    async def run(self, fn: Callable[[Runtime], Awaitable[Any]]) -> Any:
        assert self._token is not None and self._runtime is not None
        runtime, token = self._runtime, self._token
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: trio.from_thread.run(fn, runtime, trio_token=token))

    def _serve(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        async with open_runtime(self._config, models={ALIAS: self._path}) as runtime:
            self._runtime, self._stop = runtime, trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()


async def _aio_single(rt: aio.Runtime, prompt: str, max_tokens: int) -> Run:
    tally = Tally()
    async with rt.generate(ALIAS, prompt, max_tokens=max_tokens) as stream:
        async for chunk in stream:
            tally.add(chunk.token_ids)
    return tally.run()


async def _aio_batch(rt: aio.Runtime, prompts: list[list[int]], max_tokens: int) -> Run:
    tally = Tally()

    async def one(prompt: list[int]) -> None:
        async with rt.generate(ALIAS, prompt, max_tokens=max_tokens) as stream:
            async for chunk in stream:
                tally.add(chunk.token_ids)

    await asyncio.gather(*(one(prompt) for prompt in prompts))
    return tally.run()


async def _run(path: str, max_tokens: int, streams: int, batch_max_tokens: int,
               rounds: int) -> dict[str, Any]:
    config = config_from_mapping({"stream_registry": {"max_active_streams": 2 * streams}})
    single_trio: list[Run] = []
    single_aio: list[Run] = []
    single_guest: list[Run] = []
    batch_trio: list[Run] = []
    batch_aio: list[Run] = []
    batch_guest: list[Run] = []
    with _TrioSide(config, path) as trio_side:
        async with aio.open_runtime(config, models={ALIAS: path}) as rt:
            prompts = [await rt.tokenize(ALIAS, p) for p in BATCH_PROMPTS[:streams]]

            async def trio_single(runtime: Runtime) -> Run:
                return await runtime_single(runtime, PROMPT, max_tokens)

            async def trio_batch(runtime: Runtime) -> Run:
                return await runtime_batch(runtime, prompts, batch_max_tokens)

            # Warm both sides up: first calls compile kernels and allocate caches.
            await trio_side.run(trio_single)
            await _aio_single(rt, PROMPT, max_tokens)
            await trio_side.run(trio_batch)
            await _aio_batch(rt, prompts, batch_max_tokens)
            for i in range(rounds):
                # Which side goes first alternates too (ABBA), so a trend in the
                # machine's speed favours neither.
                for side in ("trio", "aio") if i % 2 == 0 else ("aio", "trio"):
                    if side == "trio":
                        single_trio.append(await trio_side.run(trio_single))
                        batch_trio.append(await trio_side.run(trio_batch))
                    else:
                        single_aio.append(await _aio_single(rt, PROMPT, max_tokens))
                        single_guest.append(await rt.run_in_trio(trio_single))
                        batch_aio.append(await _aio_batch(rt, prompts, batch_max_tokens))
                        batch_guest.append(await rt.run_in_trio(trio_batch))

    def median(runs: list[Run], rate: str) -> float:
        return float(statistics.median(getattr(r, rate) for r in runs))

    def ratio(aio_runs: list[Run], trio_runs: list[Run], rate: str) -> float:
        return float(statistics.median(getattr(a, rate) / getattr(t, rate)
                                       for a, t in zip(aio_runs, trio_runs, strict=True)))

    return {
        "aio_single_decode_tokens_per_s": median(single_aio, "decode_tokens_per_s"),
        "trio_single_decode_tokens_per_s": median(single_trio, "decode_tokens_per_s"),
        "aio_single_decode_ratio": ratio(single_aio, single_trio, "decode_tokens_per_s"),
        "aio_single_e2e_ratio": ratio(single_aio, single_trio, "e2e_tokens_per_s"),
        "aio_batch_tokens_per_s": median(batch_aio, "e2e_tokens_per_s"),
        "trio_batch_tokens_per_s": median(batch_trio, "e2e_tokens_per_s"),
        "aio_batch_ratio": ratio(batch_aio, batch_trio, "e2e_tokens_per_s"),
        "aio_batch_decode_ratio": ratio(batch_aio, batch_trio, "decode_tokens_per_s"),
        # The same trio code as the trio side, run in corral.aio's guest run: what guest
        # mode costs (trio's I/O wait moves to a thread), apart from the bridge.
        "guest_single_decode_ratio": ratio(single_guest, single_trio, "decode_tokens_per_s"),
        "guest_batch_ratio": ratio(batch_guest, batch_trio, "e2e_tokens_per_s"),
        "aio_single_tokens": [r.tokens for r in single_aio],
        "aio_batch_tokens": [r.tokens for r in batch_aio],
    }


def measure(model_path: str, smoke: bool = False) -> dict[str, Any]:
    """Run the comparison on `model_path`; returns the figures and the parameters.

    Keys: `aio_single_decode_ratio` and `aio_batch_ratio` (the goals), the tokens/s
    behind them (`aio_*`, `trio_*`), `aio_single_e2e_ratio`, `aio_batch_decode_ratio`,
    `guest_single_decode_ratio` and `guest_batch_ratio` (the trio side's own code run in
    the guest run, against the trio side: guest mode's cost without the bridge's),
    token counts per round, and `aio_parameters`. Must not be called from a running
    event loop (it runs its own asyncio loop in this thread).
    """
    parameters = dict(_SMOKE if smoke else _FULL)
    results = asyncio.run(_run(model_path, **parameters))
    return {**results, "aio_parameters": parameters}


def goals(results: dict[str, Any]) -> list[Goal]:
    """The goals of `measure`'s figures: corral.aio keeps >= 95% of the trio facade."""
    return [goal("aio_single_decode_ratio", results["aio_single_decode_ratio"], ">=", 0.95),
            goal("aio_batch_ratio", results["aio_batch_ratio"], ">=", 0.95)]


def rows(results: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Table rows (figure, corral.aio, trio facade, ratio) for `print_table`."""
    streams = results["aio_parameters"]["streams"]
    return [
        ("single stream decode tokens/s, corral.aio vs trio",
         results["aio_single_decode_tokens_per_s"], results["trio_single_decode_tokens_per_s"],
         results["aio_single_decode_ratio"]),
        (f"{streams} streams tokens/s, corral.aio vs trio", results["aio_batch_tokens_per_s"],
         results["trio_batch_tokens_per_s"], results["aio_batch_ratio"]),
    ]
