"""`corral bench serve`: `corral serve` against `mlx_lm.server`, same model, same load.

Targets, all measured in one run on the tiny model (or the model `--model` names, into
`serve-<name>.json`, with a lighter load: `_REAL`) with the same seeded prompts:
- `corral serve` with its DEFAULT configuration (no config file: what a user runs),
  tuned with `thread` isolation and with `process` isolation, and `mlx_lm.server` with
  its defaults, each a subprocess started here on a free 127.0.0.1 port and driven
  over HTTP by the load generator (`corral.bench.loadgen`);
- raw mlx_lm in this process: a bare `BatchGenerator` fed the same prompts under the
  same load, in a dedicated thread, with no HTTP at all: the ceiling.
Loads: fixed concurrency 1, 4 and 16, and Poisson arrivals at two rates. Each load is
split into rounds, and every round runs every target, in an order that turns each
round, so drift on a noisy machine hits all of them. Every figure is also reported as
a ratio to mlx_lm.server's. Goals: corral's output throughput >= 1.0x mlx_lm.server's
at each concurrency, its TTFT p99 at concurrency 16 <= 0.5x, no failed request.

Servers are always stopped (SIGTERM, then SIGKILL) and reaped, however the run ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio
from rich.progress import Progress, TaskID

from corral.bench.loadgen import (
    Load,
    LoadRun,
    Record,
    Slo,
    Target,
    arrival_offsets,
    random_prompts,
    run_load,
    summarize,
)
from corral.bench.report import Goal, goal, print_table, write_result
from corral.bench.runners import ReferenceThread, bench_model
from corral.bench.servers import (
    BASELINE,
    COMPLETION_BATCH,
    PREFILL_BATCH,
    PREFILL_STEP,
    ServerProcess,
    corral_config,
    corral_server,
    mlx_lm_server,
)

__all__ = ["main", "serve_loads"]

RAW = "raw mlx_lm"
DEFAULTS = "corral (defaults)"
THREAD = "corral (thread)"
RAY = "ray, 1 replica"
AS_STORED = "corral (as stored)"
_AS_STORED = "  cpu_dequantize: 'off'\n  cpu_blas: reference\n"

_FULL: dict[str, Any] = {
    "loads": [Load("concurrency", 96, concurrency=1), Load("concurrency", 192, concurrency=4),
              Load("concurrency", 256, concurrency=16), Load("poisson", 160, rate=10.0),
              Load("poisson", 192, rate=20.0)],
    "rounds": 2, "max_tokens": 64, "min_words": 16, "max_words": 96, "timeout_s": 120.0,
    "warmup_requests": 8, "slo": Slo(ttft_ms=250.0, tpot_ms=25.0, e2e_ms=2000.0)}
_SMOKE: dict[str, Any] = {
    "loads": [Load("concurrency", 3, concurrency=1), Load("concurrency", 4, concurrency=2),
              Load("poisson", 3, rate=20.0)],
    "rounds": 1, "max_tokens": 12, "min_words": 4, "max_words": 12, "timeout_s": 60.0,
    "warmup_requests": 2, "slo": Slo(ttft_ms=250.0, tpot_ms=25.0, e2e_ms=2000.0)}
# A real model on a CPU decodes a few tokens a second: short requests, fewer of them,
# no Poisson loads (their rates are the tiny model's), no in-process raw reference and
# no Ray phase (the harness process would compete for the same two cores).
_REAL: dict[str, Any] = {
    "loads": [Load("concurrency", 8, concurrency=1), Load("concurrency", 16, concurrency=4),
              Load("concurrency", 32, concurrency=16)],
    "rounds": 2, "max_tokens": 16, "min_words": 16, "max_words": 24, "timeout_s": 900.0,
    "warmup_requests": 4, "slo": Slo(ttft_ms=5000.0, tpot_ms=500.0, e2e_ms=20000.0)}


# -- the ceiling: raw mlx_lm in this process ---------------------------------------------


def _raw_load(prompts: Sequence[str], load: Load, offsets: Sequence[float],
              max_tokens: int) -> Callable[..., tuple[list[Record], float, float, float]]:
    """A job for the reference thread: `load` on a bare BatchGenerator, one record per
    request as the HTTP client would make it (one chunk per token, tokenizing included)."""

    def run(model: Any, tokenizer: Any, stream: Any) -> tuple[list[Record], float, float,
                                                              float]:
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(
            model, stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=COMPLETION_BATCH, prefill_batch_size=PREFILL_BATCH,
            prefill_step_size=PREFILL_STEP, stream=stream)
        records: list[Record] = []
        live: dict[int, Record] = {}
        cpu = time.process_time()
        started = time.perf_counter()
        try:
            while load.sends_more(started, time.perf_counter(), len(records)) or live:
                now = time.perf_counter()
                batch: list[tuple[Record, list[int]]] = []
                while load.sends_more(started, now, len(records)) and (
                        started + offsets[len(records)] <= now if load.kind == "poisson"
                        else len(live) + len(batch) < load.concurrency):
                    record = Record(len(records))
                    records.append(record)
                    record.sent = started + offsets[record.index] if load.kind == "poisson" \
                        else now
                    batch.append((record, tokenizer.encode(prompts[record.index
                                                                   % len(prompts)])))
                if batch:
                    uids = generator.insert([ids for _, ids in batch],
                                            max_tokens=[max_tokens] * len(batch))
                    live.update(zip(uids, (record for record, _ in batch), strict=True))
                if not live:
                    if load.kind == "poisson":
                        time.sleep(max(0.0, started + offsets[len(records)]
                                       - time.perf_counter()))
                    continue
                _, responses = generator.next()
                now = time.perf_counter()
                for response in responses:
                    record = live[response.uid]
                    record.chunk_times.append(now)
                    record.output_tokens += 1
                    if response.finish_reason is not None:
                        record.finish_reason = response.finish_reason
                        record.outcome, record.ended = "completed", now
                        del live[response.uid]
        finally:
            generator.close()
        return records, started, time.perf_counter(), time.process_time() - cpu

    return run


async def _raw_run(reference: ReferenceThread, prompts: Sequence[str], load: Load,
                   max_tokens: int, seed: int) -> LoadRun:
    offsets = arrival_offsets(load, seed=seed)
    records, started, ended, cpu = await reference.run(
        _raw_load(prompts, load, offsets, max_tokens))
    # The reference thread's CPU time is the process's: it includes the idle trio side.
    return LoadRun(RAW, load, records, started, ended, cpu)


# -- the run ------------------------------------------------------------------------------


class _Runner:
    """Runs loads against every target, round by round, collecting records per target."""

    def __init__(self, targets: list[Target], reference: ReferenceThread | None,
                 parameters: dict[str, Any], progress: Progress) -> None:
        self.targets = targets
        self.reference = reference
        self.p = parameters
        self.progress = progress

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets] + ([RAW] if self.reference else [])

    async def one(self, name: str, prompts: Sequence[str], load: Load, seed: int,
                  task: TaskID) -> LoadRun:
        def advance(record: Record) -> None:
            self.progress.advance(task)

        if name == RAW:
            assert self.reference is not None
            run = await _raw_run(self.reference, prompts, load, self.p["max_tokens"], seed)
            self.progress.advance(task, load.requests)
            return run
        target = next(t for t in self.targets if t.name == name)
        return await run_load(target, prompts, load, max_tokens=self.p["max_tokens"],
                              timeout_s=self.p["timeout_s"], seed=seed, on_done=advance)

    async def warm_up(self) -> None:
        prompts = random_prompts(self.p["warmup_requests"], seed=10_000,
                                 min_words=self.p["min_words"], max_words=self.p["max_words"])
        load = Load("concurrency", len(prompts), concurrency=4)
        task = self.progress.add_task("warm-up", total=len(prompts) * len(self.names))
        for name in self.names:
            await self.one(name, prompts, load, 0, task)

    async def level(self, index: int, load: Load) -> dict[str, list[LoadRun]]:
        """Every target under `load`, split into rounds; the order turns each round."""
        rounds = self.p["rounds"]
        size = load.requests // rounds
        runs: dict[str, list[LoadRun]] = {name: [] for name in self.names}
        timed = load.duration_s is not None
        task = self.progress.add_task(
            f"{load.label}", total=None if timed else size * rounds * len(self.names))
        for r in range(rounds):
            seed = 1000 * (index + 1) + r
            prompts = random_prompts(size, seed=seed, min_words=self.p["min_words"],
                                     max_words=self.p["max_words"])
            part = Load(load.kind, size, load.concurrency, load.rate,
                        None if load.duration_s is None else load.duration_s / rounds)
            order = self.names[r % len(self.names):] + self.names[:r % len(self.names)]
            for name in order if r % 2 == 0 else order[::-1]:
                runs[name].append(await self.one(name, prompts, part, seed, task))
        return runs


def _summary(runs: list[LoadRun], slo: Slo) -> dict[str, Any]:
    records = [r for run in runs for r in run.records]
    summary = summarize(records, sum(run.ended - run.started for run in runs), slo)
    summary["client_cpu_s"] = sum(run.client_cpu_s for run in runs)
    return summary


_HIGHER = ("output_throughput", "request_throughput", "goodput")
_LOWER = (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p99"),
          ("itl_ms", "p50"), ("itl_ms", "p99"), ("e2e_ms", "p50"), ("e2e_ms", "p99"))
_SHOWN = (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("itl_ms", "p50"),
          ("e2e_ms", "p50"), ("e2e_ms", "p99"))


def _ratios(summary: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Each figure over mlx_lm.server's (>1 is better for throughputs, worse for
    latencies)."""
    ratios = {key: _ratio(summary[key], baseline[key]) for key in _HIGHER}
    for key, q in _LOWER:
        ratios[f"{key}_{q}"] = _ratio(summary[key][q], baseline[key][q])
    return ratios


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


async def _run(servers: list[ServerProcess], reference: ReferenceThread | None,
               parameters: dict[str, Any], baseline: str = BASELINE) -> dict[str, Any]:
    slo: Slo = parameters["slo"]
    results: dict[str, Any] = {"loads": [load.label for load in parameters["loads"]],
                               "runs": {}, "ratios": {}}
    with Progress(transient=True) as progress:
        runner = _Runner([s.target for s in servers], reference, parameters, progress)
        await runner.warm_up()
        for index, load in enumerate(parameters["loads"]):
            runs = await runner.level(index, load)
            for name, target_runs in runs.items():
                results["runs"].setdefault(name, {})[load.label] = _summary(target_runs, slo)
    for name, by_load in results["runs"].items():
        results["ratios"][name] = {label: _ratios(summary, results["runs"][baseline][label])
                                   for label, summary in by_load.items()}
    return results


def _goals(results: dict[str, Any], loads: Sequence[Load], corral: Sequence[str]) -> list[Goal]:
    goals = []
    for name in corral:
        goals += [goal(f"{name} {load.label} output throughput / {BASELINE}",
                       results["ratios"][name][load.label]["output_throughput"], ">=", 1.0)
                  for load in loads if load.kind == "concurrency"]
        c16 = next((ld.label for ld in loads if ld.concurrency == 16), None)
        if c16 is not None:
            goals.append(goal(f"{name} {c16} TTFT p99 / {BASELINE}",
                              results["ratios"][name][c16]["ttft_ms_p99"], "<=", 0.5))
    for name in [*corral, BASELINE]:
        failed = sum(s["requests"] - s["completed"] for s in results["runs"][name].values())
        goals.append(goal(f"{name} requests not completed", failed, "<=", 0))
    return goals


def _table(results: dict[str, Any], loads: Sequence[Load], goals: Sequence[Goal]) -> None:
    def cell(name: str, label: str, key: str, q: str | None = None) -> str:
        summary = results["runs"][name][label]
        value = summary[key][q] if q else summary[key]
        text = f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"
        if name == BASELINE:
            return text
        ratio = results["ratios"][name][label][f"{key}_{q}" if q else key]
        return f"{text} ({ratio:.2f}x)"

    throughput, latency = [], []
    for load in loads:
        for name in results["runs"]:
            s = results["runs"][name][load.label]
            throughput.append((load.label, name, cell(name, load.label, "output_throughput"),
                               cell(name, load.label, "request_throughput"),
                               cell(name, load.label, "goodput"),
                               f"{s['mean_output_tokens']:.1f}",
                               f"{s['requests'] - s['completed']}"))
            latency.append((load.label, name, *(cell(name, load.label, key, q)
                                                for key, q in _SHOWN)))
    print_table(f"corral bench serve: throughput (ratio to {BASELINE} in brackets)",
                ["load", "target", "output tok/s", "requests/s", "goodput req/s",
                 "tokens/request", "not completed"], throughput)
    print_table(f"corral bench serve: latency, ms (ratio to {BASELINE} in brackets)",
                ["load", "target", *(f"{key.removesuffix('_ms').upper()} {q}"
                                     for key, q in _SHOWN)], latency, goals)


def _ray_table(results: dict[str, Any]) -> None:
    """The Ray target's output throughput and TTFT p50 over those of `corral serve`
    alone (both on defaults) in the same phase, per load, into `results["ray_ratio"]`
    and `results["ray_ttft_ratio"]`, and a table."""
    runs = results["ray_hop"]["runs"]
    results["ray_ratio"] = {
        label: _ratio(runs[RAY][label]["output_throughput"],
                      runs[DEFAULTS][label]["output_throughput"]) for label in runs[RAY]}
    results["ray_ttft_ratio"] = {
        label: _ratio(runs[RAY][label]["ttft_ms"]["p50"], runs[DEFAULTS][label]["ttft_ms"]["p50"])
        for label in runs[RAY]}
    print_table(f"corral bench serve: {RAY} against {DEFAULTS} alone",
                ["load", "output tok/s ratio", "TTFT p50 ratio"],
                [(label, f"{ratio:.2f}x", f"{results['ray_ttft_ratio'][label]:.2f}x")
                 for label, ratio in results["ray_ratio"].items()])


def _phase(servers: list[ServerProcess], model_path: str, parameters: dict[str, Any], *,
           reference: bool, baseline: str = BASELINE,
           one_at_a_time: bool = False) -> dict[str, Any]:
    """Start `servers` (`one_at_a_time` for real models, whose loads time out when five
    share two cores), run every load against all of them (and the in-process raw mlx_lm
    reference when asked), stop them; the results, ratios to `baseline`."""
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server.running())
            if one_at_a_time:
                server.wait_ready()
        for server in servers:
            server.wait_ready()
        runner = (stack.enter_context(ReferenceThread(model_path).running())
                  if reference else None)
        return trio.run(_run, servers, runner, parameters, baseline)


def serve_loads(preset: Sequence[Load], concurrency: Sequence[int] = (),
                duration_s: float | None = None) -> list[Load]:
    """The loads of a run: `preset`'s, or one fixed-concurrency load per `concurrency`
    (as many requests as the preset's load of the nearest concurrency), each run for
    `duration_s` seconds per target when it is given (Poisson loads keep their count)."""
    fixed = [load for load in preset if load.kind == "concurrency"]
    loads = list(preset) if not concurrency else [
        Load("concurrency", min(fixed, key=lambda ld: abs(ld.concurrency - c)).requests,
             concurrency=c) for c in concurrency]
    return [msgspec.structs.replace(load, duration_s=duration_s)
            if duration_s is not None and load.kind == "concurrency" else load
            for load in loads]


def main(smoke: bool = False, output_dir: Path | None = None,
         model: str | None = None, concurrency: Sequence[int] = (),
         duration_s: float | None = None, ray_only: bool = False) -> dict[str, Any]:
    """Run the serving benchmark on the tiny model (or `model`), print its table and
    write ``serve.json`` (``serve-<model>.json``). `concurrency` replaces the loads by
    fixed-concurrency ones; `duration_s` runs each fixed-concurrency load that many
    seconds per target (see `serve_loads`). `ray_only` runs the Ray phase alone and
    writes ``ray_hop.json`` (``ray_hop-<model>.json``) instead.

    Raises:
        SystemExit: `ray_only` without corral[ray].
    """
    has_ray = importlib.util.find_spec("ray") is not None
    if ray_only and not has_ray:
        raise SystemExit("corral bench serve --ray-only needs corral[ray]")
    model_path, suffix = bench_model(model)
    real = model is not None
    parameters: dict[str, Any] = dict(_SMOKE if smoke else _REAL if real else _FULL)
    parameters["loads"] = serve_loads(parameters["loads"], concurrency, duration_s)
    with tempfile.TemporaryDirectory(prefix="corral-bench-serve-") as directory:
        work = Path(directory)
        servers = [] if ray_only else [mlx_lm_server(model_path, work),
                   # What a user runs: no config file at all, info logs included.
                   corral_server(DEFAULTS, model_path, work, ""),
                   corral_server(THREAD, model_path, work, corral_config("thread")),
                   corral_server("corral (process)", model_path, work,
                                 corral_config("process"))]
        if real:
            # Like for like with mlx_lm.server: the weights as stored (quantized) and the
            # wheel's BLAS, so the difference is what corral's engine adds per step.
            servers.append(corral_server(AS_STORED, model_path, work,
                                         corral_config("thread", _AS_STORED)))
        results = _phase(servers, model_path, parameters, reference=not real,
                         one_at_a_time=real) if servers else {}
        hop: list[ServerProcess] = []
        if has_ray:
            # The Ray hop's cost, in a phase of its own so that the Ray cluster's
            # processes never share the cores with the targets above: one replica
            # through the ingresses against `corral serve` alone, both on defaults.
            hop = [corral_server(DEFAULTS, model_path, work, ""),
                   corral_server(RAY, model_path, work, "", ["--ray", "--replicas", "1"])]
            results["ray_hop"] = _phase(hop, model_path, parameters, reference=False,
                                        baseline=DEFAULTS, one_at_a_time=real)
        results["exit_codes"] = {server.name: server.returncode for server in servers}
        if hop:
            results["exit_codes"][RAY] = hop[1].returncode
    corral = [s.name for s in servers if s.name != BASELINE]
    goals = _goals(results, parameters["loads"], corral) if servers else []
    if hop:
        failed = sum(s["requests"] - s["completed"]
                     for s in results["ray_hop"]["runs"][RAY].values())
        goals.append(goal(f"{RAY} requests not completed", failed, "<=", 0))
    if servers:
        _table(results, parameters["loads"], goals)
    if hop:
        _ray_table(results)
    write_result(f"{'ray_hop' if ray_only else 'serve'}{suffix}", {
        **parameters, "smoke": smoke, "model": model_path,
        "targets": {s.name: " ".join(s.command[1:]) for s in [*servers, *hop]} | (
            {} if real or ray_only else
            {RAW: "mlx_lm BatchGenerator in the harness process, same batch sizes"}),
        "ray_hop": "a second phase, after the first's servers stopped: the Ray target "
                   "and corral serve alone, both on defaults, side by side "
                   "(results.ray_hop, ray_ratio, ray_ttft_ratio)",
        "corral_config": {"defaults": "(none)", "thread": corral_config("thread"),
                          "process": corral_config("process")} | (
            {"as stored": corral_config("thread", _AS_STORED)} if real else {}),
        "request": "POST /v1/completions, stream, stream_options.include_usage, "
                   "temperature 0, max_tokens as above",
        "order": "each load split into rounds; every round runs every target; the order "
                 "turns and reverses each round",
        "figures": "vLLM bench serve definitions; latencies of completed requests; "
                   "throughputs over the load's wall time summed over rounds",
    }, results, goals, directory=output_dir, smoke=smoke)
    return results
