"""`corral bench plot`: PNG charts of the recorded serving benchmarks.

Reads ``serve.json`` (and ``chaos.json`` when present) from the results directory and
draws, with matplotlib's Agg backend (no display, no pyplot global state):
- ``serve_latency.png``: TTFT, TPOT, ITL and end-to-end latency, p50 / p90 / p99, per
  load (concurrency, then Poisson rate), one line per target;
- ``serve_throughput.png``: output tokens/s, requests/s and goodput per load and
  target, each corral bar labelled with its ratio to mlx_lm.server;
- ``chaos.png``: requests completed / failed / lost / hung per fault, and the time to
  recover from each kill.
It only reads results; it never runs a benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from corral.bench.report import RESULTS_DIR
from corral.bench.servers import BASELINE as _BASELINE

__all__ = ["main"]

_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
_QUANTILES = ("p50", "p90", "p99")
_THROUGHPUTS = (("output_throughput", "output tokens/s"), ("request_throughput", "requests/s"),
                ("goodput", "goodput, requests/s within SLO"))


def _caption(document: dict[str, Any]) -> str:
    machine = document["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    return (f"{document['recorded_at']} · {machine['cpus']} CPUs {machine['machine']} · "
            f"{versions}")


def _latency(document: dict[str, Any], path: Path) -> Path:
    results = document["results"]
    loads: list[str] = results["loads"]
    # Fixed concurrency and Poisson rates are separate lines: no trend runs between them.
    groups = [[i for i, label in enumerate(loads) if label.endswith("req/s") == poisson]
              for poisson in (False, True)]
    figure = Figure(figsize=(15, 13), layout="constrained")
    axes = figure.subplots(len(_METRICS), len(_QUANTILES), sharex=True)
    for row, (key, name) in enumerate(_METRICS):
        for col, q in enumerate(_QUANTILES):
            ax: Axes = axes[row][col]
            for n, (target, by_load) in enumerate(results["runs"].items()):
                for group in groups:
                    ax.plot(group, [by_load[loads[i]][key][q] for i in group], marker="o",
                            color=f"C{n}", label=target if group is groups[0] else None,
                            linewidth=2.5 if target == _BASELINE else 1.5)
            ax.set_xticks(range(len(loads)), loads)
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize="x-small")
            ax.set_title(f"{name} {q}")
            ax.set_ylabel("ms")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle(f"corral bench serve: latency per load (lower is better)\n"
                    f"{_caption(document)}", fontsize="medium")
    figure.savefig(path, dpi=90)
    return path


def _throughput(document: dict[str, Any], path: Path) -> Path:
    results = document["results"]
    loads: list[str] = results["loads"]
    targets = list(results["runs"])
    figure = Figure(figsize=(15, 5.5), layout="constrained")
    axes = figure.subplots(1, len(_THROUGHPUTS))
    width = 0.8 / len(targets)
    for ax, (key, name) in zip(axes, _THROUGHPUTS, strict=True):
        for i, target in enumerate(targets):
            xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(loads))]
            values = [results["runs"][target][label][key] for label in loads]
            bars = ax.bar(xs, values, width, label=target)
            if target != _BASELINE:
                ratios = [results["ratios"][target][label][key] for label in loads]
                ax.bar_label(bars, [f"{r:.2f}x" for r in ratios], fontsize=6, rotation=90,
                             padding=2)
        ax.set_xticks(range(len(loads)), loads)
        ax.set_title(name)
        ax.margins(y=0.15)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(f"corral bench serve: throughput per load (higher is better; "
                    f"ratios to {_BASELINE})\n{_caption(document)}", fontsize="medium")
    figure.savefig(path, dpi=90)
    return path


def _chaos(document: dict[str, Any], path: Path) -> Path:
    runs: dict[str, Any] = document["results"]["runs"]
    faults = list(runs)
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    outcomes, recover = figure.subplots(1, 2)
    bottom = [0.0] * len(faults)
    for outcome in ("completed", "failed", "lost", "hung"):
        values = [float(runs[f][outcome]) for f in faults]
        bars = outcomes.bar(faults, values, bottom=bottom, label=outcome)
        outcomes.bar_label(bars, [f"{v:g}" if v else "" for v in values], label_type="center")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    outcomes.set_title("requests by outcome (lost and hung must be 0)")
    outcomes.set_ylim(0, max(bottom, default=1.0) * 1.25)
    outcomes.legend(fontsize="small", ncols=4, loc="upper center")
    faulted = [f for f in faults if runs[f]["kills"]]
    p50 = [runs[f]["recover_p50_ms"] or 0.0 for f in faulted]
    top = [runs[f]["recover_max_ms"] or 0.0 for f in faulted]
    recover.bar(faulted, top, label="max", alpha=0.5)
    recover.bar(faulted, p50, label="p50")
    recover.set_title("kill to the next token after the restart, ms")
    recover.set_xticks(range(len(faulted)),
                       [f"{f}\n{runs[f]['kills']} kills, {runs[f]['restarts']:g} restarts"
                        for f in faulted])
    recover.margins(y=0.2)
    recover.legend(fontsize="small", ncols=2, loc="upper center")
    figure.suptitle(f"corral bench chaos\n{_caption(document)}", fontsize="medium")
    figure.savefig(path, dpi=90)
    return path


def main(results_dir: Path | None = None, output_dir: Path | None = None) -> list[Path]:
    """Draw the charts of the results in `results_dir` into `output_dir` (by default
    the results directory); return the PNGs written. A missing result is skipped."""
    results_dir = results_dir or RESULTS_DIR
    output_dir = output_dir or results_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    serve = results_dir / "serve.json"
    if serve.exists():
        document = json.loads(serve.read_text())
        written.append(_latency(document, output_dir / "serve_latency.png"))
        written.append(_throughput(document, output_dir / "serve_throughput.png"))
    chaos = results_dir / "chaos.json"
    if chaos.exists():
        written.append(_chaos(json.loads(chaos.read_text()), output_dir / "chaos.png"))
    for path in written:
        print(path)
    return written
