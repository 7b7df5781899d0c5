"""`corral bench chaos`: the serving load while the model's worker process is killed.

`corral serve` runs the tiny model with `process` isolation and restart limits high
enough never to give up. First a run with no fault gives each prompt's reference text;
then, per signal (SIGKILL, and SIGSEGV as a crash from inside), the same load at
concurrency 16 runs while a killer sends that signal to the model's worker every few
seconds: the worker `/health` names as serving the model (a standby worker waits beside
it). Figures per run: requests completed, failed by error code, lost (no final response:
must be 0), hung (no end within the per-request timeout: must be 0), completed with a
text other than the fault-free run's (greedy requests are resumed, so 0 is expected),
restarts (from `/metrics`, `corral_actor_restarts_total`) and time to recover: from a
kill to the first token any client received after another worker served.

`corral serve` has no remote fault-injection hook (JSON-RPC exposes no `inject_fault`;
only the embedded `Runtime.inject_fault` does), so engine errors are injected as
signals to the worker from outside, the way the OS would deliver them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
from rich.progress import Progress

from corral.bench.loadgen import (
    Load,
    LoadRun,
    Record,
    Slo,
    random_prompts,
    run_load,
    summarize,
)
from corral.bench.report import goal, percentile, print_table, write_result
from corral.bench.servers import ServerProcess, corral_server
from corral.tiny import default_model_path

__all__ = ["main", "serving_worker_pid"]

_CONFIG = (
    "generation:\n  isolation: process\n"
    "python_runtime:\n  max_restarts: 1000\n  restart_period_ms: 60000\n"
    "  restart_delay_base_ms: 10\n  restart_delay_max_ms: 200\n"
    "supervision:\n  max_restarts: 1000\n  period_ms: 60000\n"
    "stream_registry:\n  max_active_streams: 32\n  max_queued: 4096\n"
    "server:\n  drain_timeout_ms: 2000\n"
    "logging:\n  format: json\n  level: warning\n")
_FULL: dict[str, Any] = {"requests": 480, "concurrency": 16, "max_tokens": 64, "min_words": 16,
         "max_words": 96, "timeout_s": 60.0, "first_kill_s": 0.5, "kill_interval_s": 3.0,
         "max_kills": 8, "signals": ["SIGKILL", "SIGSEGV"]}
_SMOKE: dict[str, Any] = {"requests": 24, "concurrency": 16, "max_tokens": 32, "min_words": 4,
          "max_words": 12, "timeout_s": 30.0, "first_kill_s": 0.0, "kill_interval_s": 3.0,
          "max_kills": 1, "signals": ["SIGKILL", "SIGSEGV"]}
_REPLACED_S = 30.0  # how long the killer looks for a replacement worker
_RESTARTS = re.compile(r'^corral_actor_restarts_total\{actor="([^"]*)"\} (\S+)$', re.MULTILINE)


class Kill(msgspec.Struct):
    """One kill: the pid and signal, when it was sent and when a new worker appeared
    (`time.perf_counter()`; NaN if none did in time)."""

    pid: int
    signal: str
    at: float
    replaced_at: float = math.nan


async def serving_worker_pid(base_url: str) -> int | None:
    """The pid of the worker serving the first model, as `/health` reports it (the
    standby worker beside it serves nothing); None while it restarts."""
    async with httpx.AsyncClient(timeout=10.0) as client:
        health = msgspec.json.decode((await client.get(f"{base_url}/health")).content)
    for model in health.get("models", []):
        if model.get("state") == "ready" and model.get("worker_pid") is not None:
            return int(model["worker_pid"])
    return None


async def _killer(base_url: str, signum: signal.Signals, parameters: dict[str, Any],
                  first_done: trio.Event, kills: list[Kill]) -> None:
    """`first_kill_s` after the first request completed, then every `kill_interval_s`,
    send `signum` to the serving worker; note when another one serves."""
    await first_done.wait()  # so that even a short load is killed mid-flight
    await trio.sleep(parameters["first_kill_s"])
    while len(kills) < parameters["max_kills"]:
        victim = await serving_worker_pid(base_url)
        if victim is not None:
            kill = Kill(victim, signum.name, time.perf_counter())
            with contextlib.suppress(ProcessLookupError):
                os.kill(kill.pid, signum)
            kills.append(kill)
            with trio.move_on_after(_REPLACED_S):
                while await serving_worker_pid(base_url) in (None, kill.pid):
                    await trio.sleep(0.005)
                kill.replaced_at = time.perf_counter()
        await trio.sleep(parameters["kill_interval_s"])


async def _restarts(base_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    return {actor: float(value) for actor, value in _RESTARTS.findall(text)}


def _recoveries(kills: list[Kill], records: list[Record]) -> list[float]:
    """Per kill with a replacement: seconds from the kill to the first token a client
    received after the replacement appeared (none if the load ended first)."""
    arrivals = sorted(t for r in records for t in r.chunk_times)
    recoveries = []
    for kill in kills:
        after = next((t for t in arrivals if t > kill.replaced_at), None)
        if after is not None:
            recoveries.append(after - kill.at)
    return recoveries


async def _faulted(server: ServerProcess, prompts: list[str], load: Load,
                   parameters: dict[str, Any], signum: signal.Signals | None,
                   progress: Progress) -> tuple[LoadRun, list[Kill], dict[str, float]]:
    task = progress.add_task(signum.name if signum else "no fault (reference)",
                             total=load.requests)
    before = await _restarts(server.target.base_url)
    kills: list[Kill] = []
    first_done = trio.Event()

    def done(record: Record) -> None:
        first_done.set()
        progress.advance(task)

    async with trio.open_nursery() as nursery:
        if signum is not None:
            nursery.start_soon(_killer, server.target.base_url, signum, parameters,
                               first_done, kills)
        run = await run_load(server.target, prompts, load, max_tokens=parameters["max_tokens"],
                             timeout_s=parameters["timeout_s"], on_done=done)
        nursery.cancel_scope.cancel()
    # A kill right at the end may still be restarting; let the count settle.
    with trio.move_on_after(_REPLACED_S):
        while await serving_worker_pid(server.target.base_url) is None:
            await trio.sleep(0.05)
    after = await _restarts(server.target.base_url)
    restarts = {actor: count - before.get(actor, 0.0) for actor, count in after.items()
                if count != before.get(actor, 0.0)}
    return run, kills, restarts


def _result(run: LoadRun, kills: list[Kill], restarts: dict[str, float],
            reference: dict[int, str]) -> dict[str, Any]:
    summary = summarize(run.records, run.ended - run.started, Slo())
    completed = [r for r in run.records if r.outcome == "completed"]
    recoveries = _recoveries(kills, run.records)
    return {
        "requests": summary["requests"], "completed": summary["completed"],
        "failed": summary["failed"], "lost": summary["lost"], "hung": summary["hung"],
        "errors": summary["errors"],
        "text_differs_from_reference": sum(r.text != reference.get(r.index)
                                           for r in completed),
        "kills": len(kills),
        "kills_replaced": sum(not math.isnan(k.replaced_at) for k in kills),
        "restarts": sum(restarts.values()), "restarts_by_actor": restarts,
        "recover_p50_ms": percentile(recoveries, 50) * 1e3,
        "recover_max_ms": max(recoveries, default=math.nan) * 1e3,
        "replaced_p50_ms": percentile([k.replaced_at - k.at for k in kills
                                       if not math.isnan(k.replaced_at)], 50) * 1e3,
        "duration_s": summary["duration_s"],
        "output_throughput": summary["output_throughput"],
        "ttft_ms": summary["ttft_ms"], "e2e_ms": summary["e2e_ms"],
    }


async def _run(server: ServerProcess, parameters: dict[str, Any]) -> dict[str, Any]:
    prompts = random_prompts(parameters["requests"], seed=7, min_words=parameters["min_words"],
                             max_words=parameters["max_words"])
    load = Load("concurrency", parameters["requests"], concurrency=parameters["concurrency"])
    results: dict[str, Any] = {}
    with Progress(transient=True) as progress:
        run, _, restarts = await _faulted(server, prompts, load, parameters, None, progress)
        reference = {r.index: r.text for r in run.records if r.outcome == "completed"}
        results["none"] = _result(run, [], restarts, reference)
        for name in parameters["signals"]:
            run, kills, restarts = await _faulted(server, prompts, load, parameters,
                                                  signal.Signals[name], progress)
            results[name] = _result(run, kills, restarts, reference)
    return results


def main(smoke: bool = False, output_dir: Path | None = None) -> dict[str, Any]:
    """Run the chaos benchmark, print its table and write ``chaos.json``."""
    parameters: dict[str, Any] = dict(_SMOKE if smoke else _FULL)
    model_path = str(default_model_path())
    with tempfile.TemporaryDirectory(prefix="corral-bench-chaos-") as directory:
        server = corral_server("corral (process)", model_path, Path(directory), _CONFIG)
        with server.running():
            server.wait_ready()
            results = trio.run(_run, server, parameters)
            alive = server.process is not None and server.process.poll() is None
        results_all: dict[str, Any] = {"runs": results, "server_survived": alive,
                                       "server_exit_code": server.returncode}
    goals = []
    for name in parameters["signals"]:
        goals += [goal(f"{name} lost", results[name]["lost"], "<=", 0),
                  goal(f"{name} hung", results[name]["hung"], "<=", 0)]
    goals.append(goal("server survived", float(alive), ">=", 1))
    print_table("corral bench chaos (corral serve, process isolation, concurrency "
                f"{parameters['concurrency']})",
                ["fault", "requests", "completed", "failed by code", "lost", "hung",
                 "text differs", "kills", "restarts", "recover p50 / max ms"],
                [(name, r["requests"], r["completed"],
                  ", ".join(f"{k}: {v}" for k, v in r["errors"].items()
                            if not k.startswith(("lost", "hung"))) or "0",
                  r["lost"], r["hung"], r["text_differs_from_reference"], r["kills"],
                  f"{r['restarts']:g}",
                  f"{r['recover_p50_ms']:,.0f} / {r['recover_max_ms']:,.0f}"
                  if r["kills"] else "-")
                 for name, r in results.items()], goals)
    write_result("chaos", {
        **parameters, "smoke": smoke, "model": model_path, "config": _CONFIG,
        "fault_injection": "signals to the worker process from outside: corral serve has "
                           "no remote fault-injection hook",
        "recover": "kill to the first token any client received after the replacement "
                   "worker process appeared",
    }, results_all, goals, directory=output_dir, smoke=smoke)
    return results_all
