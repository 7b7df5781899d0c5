"""`corral bench prefix-cache`: multi-turn chat against mlx_lm.server, and resume after a crash.

Part 1, the workload a chat app or an agent sends: conversations of several turns that
all start with the same long system prompt, each turn resending the whole conversation
(the assistant's own earlier replies included) through `/v1/chat/completions`, a fixed
number of conversations at once. Targets, started here on free 127.0.0.1 ports and
measured in one run: `mlx_lm.server` with its defaults, `corral serve` with its
defaults, and `corral serve` with the prefix cache off (what the cache itself buys).
The run is split into rounds, each with a system prompt of its own (so every target's
cache starts cold), and the order of the targets turns each round. Figures: TTFT
p50/p99 (all turns, and per turn), output throughput, and the hit rate (the usage's
`cached_tokens` over `prompt_tokens`). Goals: corral's TTFT p50 <= 0.8x
mlx_lm.server's, output throughput >= 1.0x.

Part 2, a crash: `corral serve` with process isolation streams a greedy completion of a
long prompt; after a few tokens its worker is killed with SIGKILL; the figure is the
time from the kill to the resumed stream's next token, with the disk tier
(`generation.prefix_cache.disk_dir`) and without it. That time holds the worker's
restart (a new process importing mlx_lm and loading the model) as well as the resumed
prefill, which is all the disk tier can shorten. Goal: with/without <= 0.25x. The
model is the tiny one with a 4,096-token context, so the prompt fits.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from rich.progress import Progress

from corral.bench.chaos import serving_worker_pid
from corral.bench.loadgen import Record, stream_request
from corral.bench.report import Goal, goal, percentile, print_table, write_result
from corral.bench.runners import bench_model
from corral.bench.servers import ServerProcess, corral_server, free_port
from corral.tiny import make_tiny_model

__all__ = ["main"]

BASELINE = "mlx_lm.server"
CORRAL = "corral serve"
NO_CACHE = "corral serve, prefix cache off"
_WORDS = ("river", "valley", "engine", "garden", "station", "harbor", "letter", "market",
          "window", "morning", "library", "teacher", "bridge", "summer", "mountain",
          "village", "concert", "painting", "company", "language", "computer", "storm")

_FULL: dict[str, Any] = {"conversations": 8, "turns": 3, "concurrency": 4, "system_tokens": 1500,
         "user_words": (12, 30), "max_tokens": 48, "rounds": 4, "timeout_s": 120.0,
         "resume_prompt_tokens": 2500, "resume_max_tokens": 1000, "resume_kill_after": 8,
         "resume_runs": 3}
_SMOKE: dict[str, Any] = {"conversations": 2, "turns": 2, "concurrency": 2, "system_tokens": 300,
          "user_words": (4, 8), "max_tokens": 8, "rounds": 1, "timeout_s": 60.0,
          "resume_prompt_tokens": 400, "resume_max_tokens": 400, "resume_kill_after": 4,
          "resume_runs": 1}
# A real model on a CPU (`--model`): a shorter system prompt and fewer, shorter turns;
# part 2 (the worker restart) stays the tiny model's.
_REAL: dict[str, Any] = {"conversations": 4, "turns": 3, "concurrency": 2, "system_tokens": 400,
         "user_words": (8, 16), "max_tokens": 16, "rounds": 2, "timeout_s": 1800.0}
_QUIET = "logging:\n  format: json\n  level: warning\n"


# -- part 1: multi-turn chat ------------------------------------------------------------


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _system_prompt(model_path: str, tokens: int, seed: int) -> str:
    """Random words until the tiny tokenizer counts `tokens` of them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    rng = random.Random(seed)
    text = f"You are assistant number {seed}. Remember these notes:"
    while len(tokenizer.encode(text).ids) < tokens:
        text += " " + _words(rng, 16) + "."
    return text


async def _conversation(client: httpx.AsyncClient, server: ServerProcess, system: str,
                        users: list[str], max_tokens: int, timeout_s: float) -> list[Record]:
    """One conversation, turn after turn, each resending the whole history."""
    messages = [{"role": "system", "content": system}]
    records = []
    for turn, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens,
                                "temperature": 0.0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if server.target.model is not None:
            body["model"] = server.target.model
        record = Record(turn)
        with trio.move_on_after(timeout_s) as scope:
            await stream_request(client, f"{server.target.base_url}/v1/chat/completions",
                                 body, record)
        if scope.cancelled_caught:
            record.outcome, record.code = "hung", "client timeout"
            record.ended = time.perf_counter()
        records.append(record)
        if record.outcome != "completed":
            break
        messages.append({"role": "assistant", "content": record.text})
    return records


async def _chat_round(server: ServerProcess, system: str, users: list[list[str]],
                      p: dict[str, Any]) -> dict[str, Any]:
    """Every conversation against one server, `concurrency` at a time."""
    results: list[list[Record]] = [[] for _ in users]
    queue = iter(range(len(users)))
    limits = httpx.Limits(max_connections=p["concurrency"])
    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) as client:

        async def worker() -> None:
            for i in queue:
                results[i] = await _conversation(client, server, system, users[i],
                                                  p["max_tokens"], p["timeout_s"])

        async with trio.open_nursery() as nursery:
            for _ in range(p["concurrency"]):
                nursery.start_soon(worker)
    return {"records": results, "seconds": time.perf_counter() - started}


def _chat_summary(rounds: list[dict[str, Any]], turns: int) -> dict[str, Any]:
    records = [r for rnd in rounds for conv in rnd["records"] for r in conv]
    done = [r for r in records if r.outcome == "completed"]
    ttft = [r.ttft * 1e3 for r in done if r.ttft is not None]
    prompt = sum(r.prompt_tokens or 0 for r in done)
    cached = sum(r.cached_tokens or 0 for r in done)
    seconds = sum(rnd["seconds"] for rnd in rounds)
    by_turn = {}
    for turn in range(turns):
        values = [r.ttft * 1e3 for r in done if r.index == turn and r.ttft is not None]
        by_turn[str(turn + 1)] = percentile(values, 50)
    return {
        "requests": len(records), "completed": len(done),
        "not_completed": len(records) - len(done),
        "ttft_ms": {"p50": percentile(ttft, 50), "p90": percentile(ttft, 90),
                    "p99": percentile(ttft, 99), "mean": statistics.fmean(ttft) if ttft
                    else float("nan")},
        "ttft_ms_p50_by_turn": by_turn,
        "output_tokens": sum(r.output_tokens for r in done),
        "output_throughput": sum(r.output_tokens for r in done) / seconds,
        "prompt_tokens": prompt, "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else float("nan"),
        "seconds": seconds,
    }


def _chat(model_path: str, work: Path, p: dict[str, Any],
          progress: Progress) -> dict[str, Any]:
    servers = [
        ServerProcess(BASELINE, [sys.executable, "-m", "mlx_lm.server", "--model", model_path,
                                 "--host", "127.0.0.1", "--port", str(port := free_port())],
                      port, None, work / "mlx_lm.server.log"),
        _corral_serve(CORRAL, model_path, work, None),
        _corral_serve(NO_CACHE, model_path, work,
                      "generation:\n  prefix_cache:\n    enabled: false\n"),
    ]
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    task = progress.add_task("multi-turn chat",
                             total=p["rounds"] * len(servers) * p["conversations"])
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server.running())
        for server in servers:
            server.wait_ready()
        for r in range(p["rounds"]):
            rng = random.Random(100 + r)
            system = _system_prompt(model_path, p["system_tokens"], seed=100 + r)
            users = [[_words(rng, rng.randint(*p["user_words"])) + "?"
                      for _ in range(p["turns"])] for _ in range(p["conversations"])]
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for server in order if r % 2 == 0 else order[::-1]:
                runs[server.name].append(trio.run(_chat_round, server, system, users, p))
                progress.advance(task, p["conversations"])
    summaries = {name: _chat_summary(rounds, p["turns"]) for name, rounds in runs.items()}
    base = summaries[BASELINE]
    for s in summaries.values():
        s["ratios"] = {
            "ttft_p50": s["ttft_ms"]["p50"] / base["ttft_ms"]["p50"],
            "ttft_p99": s["ttft_ms"]["p99"] / base["ttft_ms"]["p99"],
            "output_throughput": s["output_throughput"] / base["output_throughput"]}
    return summaries


def _corral_serve(name: str, model_path: str, work: Path, config: str | None) -> ServerProcess:
    """`corral serve` on its default configuration, plus `config` (YAML) if given; its
    logs at warning level (they go to a file either way)."""
    return corral_server(name, model_path, work, (config or "") + _QUIET)


# -- part 2: kill -9 mid-stream, resume with and without the disk tier --------------------


async def _resume_once(server: ServerProcess, prompt: list[int],
                       p: dict[str, Any]) -> dict[str, float]:
    """Stream one long greedy completion, SIGKILL the worker after a few tokens (long
    before the last), and time the gap the client sees."""
    body = {"model": server.target.model, "prompt": prompt, "max_tokens": p["resume_max_tokens"],
            "temperature": 0.0, "stream": True}
    record = Record(0)
    killed_at = math.nan
    killed = trio.Event()

    async def kill_when_due() -> None:
        nonlocal killed_at
        while len(record.chunk_times) < p["resume_kill_after"]:
            await trio.sleep(0.001)
        pid = await serving_worker_pid(server.target.base_url)
        assert pid is not None
        killed_at = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        killed.set()

    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client, \
            trio.open_nursery() as nursery:
        nursery.start_soon(kill_when_due)
        with trio.fail_after(p["timeout_s"]):
            await stream_request(client, f"{server.target.base_url}/v1/completions", body,
                                 record)
    if record.outcome != "completed" or not killed.is_set():
        raise RuntimeError(f"{server.name}: the resumed stream did not complete: "
                           f"{record.outcome} {record.code}")
    # Tokens the worker sent just before it died may still arrive after the kill; the
    # resumed stream's first token is the one that ends the longest silence after it.
    times = [killed_at, *(t for t in record.chunk_times if t > killed_at)]
    resumed = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])
    return {"kill_to_next_token_s": times[resumed] - killed_at}


def _resume(work: Path, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    model_path = str(make_tiny_model(work / "tiny-4k", context=4096))
    rng = random.Random(7)
    results: dict[str, Any] = {}
    base = ("generation:\n  isolation: process\n"
            "python_runtime:\n  restart_delay_base_ms: 10\n  restart_delay_max_ms: 100\n")
    variants = {
        "without disk tier": base,
        "with disk tier": base.replace(
            "isolation: process\n",
            f"isolation: process\n  prefix_cache:\n    disk_dir: {work / 'prefix-cache'}\n"),
    }
    task = progress.add_task("kill -9 and resume", total=p["resume_runs"] * len(variants))
    for name, config in variants.items():
        server = corral_server(f"corral ({name})", model_path, work, config + _QUIET)
        gaps = []
        with server.running():
            server.wait_ready()
            for _ in range(p["resume_runs"]):
                # A prompt of its own each run: only the disk tier may hold it.
                prompt = [rng.randrange(3, 200) for _ in range(p["resume_prompt_tokens"])]
                outcome = trio.run(_resume_once, server, prompt, p)
                gaps.append(outcome["kill_to_next_token_s"])
                progress.advance(task)
        results[name] = {"kill_to_next_token_s": gaps,
                         "median_s": statistics.median(gaps)}
    results["ratio"] = (results["with disk tier"]["median_s"]
                        / results["without disk tier"]["median_s"])
    return results


# -- the run -------------------------------------------------------------------------------


def _goals(chat: dict[str, Any], resume: dict[str, Any] | None) -> list[Goal]:
    ours = chat[CORRAL]["ratios"]
    return [
        goal(f"{CORRAL} TTFT p50 / {BASELINE}", ours["ttft_p50"], "<=", 0.8),
        goal(f"{CORRAL} output throughput / {BASELINE}", ours["output_throughput"], ">=", 1.0),
        goal(f"{CORRAL} requests not completed", chat[CORRAL]["not_completed"], "<=", 0),
        *([] if resume is None else [goal("kill -9 to next token, with disk tier / without",
                                          resume["ratio"], "<=", 0.25)]),
    ]


def main(smoke: bool = False, output_dir: Path | None = None,
         model: str | None = None) -> dict[str, Any]:
    """Run both parts on the tiny model (part 1 alone, lighter, on `model`), print their
    tables and write ``prefix_cache.json`` (``prefix_cache-<model>.json``)."""
    model_path, suffix = bench_model(model)
    p: dict[str, Any] = dict(_SMOKE if smoke else _FULL if model is None else _REAL)
    with tempfile.TemporaryDirectory(prefix="corral-bench-prefix-") as directory, \
            Progress(transient=True) as progress:
        work = Path(directory)
        chat = _chat(model_path, work, p, progress)
        resume = _resume(work, p, progress) if model is None else None
    goals = _goals(chat, resume)
    rows = []
    for name, s in chat.items():
        ratio = "" if name == BASELINE else (
            f" ({s['ratios']['ttft_p50']:.2f}x)")
        rows.append((name, f"{s['ttft_ms']['p50']:.0f}{ratio}", f"{s['ttft_ms']['p99']:.0f}",
                     " / ".join(f"{v:.0f}" for v in s["ttft_ms_p50_by_turn"].values()),
                     f"{s['output_throughput']:.1f}", f"{100 * s['hit_rate']:.1f}%",
                     str(s["not_completed"])))
    print_table(f"corral bench prefix-cache: {p['conversations']} conversations x "
                f"{p['turns']} turns, {p['system_tokens']}-token system prompt, "
                f"concurrency {p['concurrency']}",
                ["target", "TTFT p50 ms", "TTFT p99 ms", "TTFT p50 by turn", "output tok/s",
                 "hit rate", "not completed"], rows, goals if resume is None else ())
    if resume is not None:
        print_table(f"kill -9 of the worker mid-stream, {p['resume_prompt_tokens']}-token "
                    f"prompt", ["variant", "kill to next token, s (median)", "runs"],
                    [(name, f"{r['median_s']:.3f}", ", ".join(f"{g:.3f}" for g in
                                                               r["kill_to_next_token_s"]))
                     for name, r in resume.items() if name != "ratio"], goals)
    write_result(f"prefix_cache{suffix}", {
        **p, "smoke": smoke, "model": model_path,
        "targets": {BASELINE: "python -m mlx_lm.server --model MODEL (its defaults)",
                    CORRAL: "corral serve --model tiny=MODEL (its defaults)",
                    NO_CACHE: "corral serve, generation.prefix_cache.enabled: false"},
        "request": "POST /v1/chat/completions, stream, include_usage, temperature 0",
        "order": "rounds, each with its own system prompt; the target order turns",
    }, {"chat": chat, "resume": resume}, goals, directory=output_dir, smoke=smoke)
    return {"chat": chat, "resume": resume}
