"""What a gang costs: one model served by N ranks (mlx.distributed, ring over loopback)
against the same model in one worker process, in one runtime, side by side.

    python benchmarks/gang.py MODEL_DIR [RANKS] [ROUNDS] [CONCURRENCY]

Both models are loaded in one embedded runtime (process isolation); each round runs
CONCURRENCY concurrent streamed completions of 64 greedy tokens on one, then on the
other (the order flips every round, so drift of the machine falls on both alike), and
records output tokens per second and each stream's time to first token. It prints the
medians and the ratios gang/single. Only 127.0.0.1; nothing is written.

On one machine the ranks share the cores the single process has, so the ratio is the
lockstep's cost (a tick per step, and an all-reduce twice per layer over loopback),
not the speed-up a gang of hosts gives a model too large for one.
"""

from __future__ import annotations

import statistics
import sys
import time

import trio

import corral
from corral.config import config_from_mapping


async def _round(rt: corral.Runtime, alias: str, concurrency: int) -> tuple[float, list[float]]:
    tokens, ttfts = 0, []
    started = time.perf_counter()

    async def one(index: int) -> None:
        nonlocal tokens
        sent = time.perf_counter()
        first = None
        async with rt.generate(alias, f"The river {index} runs", max_tokens=64) as stream:
            async for _ in stream:
                first = first or time.perf_counter() - sent
        ttfts.append(first or 0.0)
        tokens += len(stream.token_ids)

    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(one, index)
    return tokens / (time.perf_counter() - started), ttfts


async def main(model: str, ranks: int, rounds: int, concurrency: int) -> None:
    config = config_from_mapping({"generation": {"isolation": "process", "models": [
        {"alias": "single", "path": model},
        {"alias": "gang", "path": model, "distributed": {"ranks": ranks}}]}})
    async with corral.open_runtime(config) as rt:
        for alias in ("single", "gang"):
            await rt.complete(alias, "warm up", max_tokens=8)
        throughput: dict[str, list[float]] = {"single": [], "gang": []}
        ttft: dict[str, list[float]] = {"single": [], "gang": []}
        for index in range(rounds):
            order = ("single", "gang") if index % 2 == 0 else ("gang", "single")
            for alias in order:
                tps, ttfts = await _round(rt, alias, concurrency)
                throughput[alias].append(tps)
                ttft[alias].extend(ttfts)
    single_tps, gang_tps = (statistics.median(throughput[a]) for a in ("single", "gang"))
    single_ttft, gang_ttft = (statistics.median(ttft[a]) for a in ("single", "gang"))
    print(f"model {model}, {ranks} ranks, c={concurrency}, {rounds} rounds")
    print(f"single: {single_tps:.1f} tok/s, TTFT p50 {single_ttft * 1000:.0f} ms")
    print(f"gang:   {gang_tps:.1f} tok/s, TTFT p50 {gang_ttft * 1000:.0f} ms")
    print(f"gang/single: throughput {gang_tps / single_tps:.3f}x, "
          f"TTFT p50 {gang_ttft / single_ttft:.3f}x")


if __name__ == "__main__":
    args = sys.argv[1:]
    trio.run(main, args[0], int(args[1]) if len(args) > 1 else 2,
             int(args[2]) if len(args) > 2 else 6, int(args[3]) if len(args) > 3 else 8)
