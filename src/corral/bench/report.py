"""What every benchmark shares: the machine record, percentiles, the JSON file, the table.

Benchmarks report ratios measured side by side in one run; this module only records and
prints them. It never decides whether a goal is met: each bench states its goals.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path("benchmarks/results")

PROMPTS = (
    "The quick brown fox", "A river runs through", "She opened the window and",
    "Every morning he walks to the station", "The library closes at",
    "Please send the report by Friday so that", "Our team finished",
    "The children built a castle of sand on the beach", "In the winter",
    "He asked whether the museum was open", "The recipe calls for three eggs",
    "When the music started, the whole room", "Scientists measured the temperature",
    "The old bridge", "I think we should leave early tomorrow, because", "The cat slept",
)
"""Sixteen distinct prompts (the tiny model's corpus's first words), shared by the
benches so that no two concurrent streams are alike."""

_UNBOUNDED = 10_000
"""Columns of a console writing to a file or a pipe: wider than any table."""

_PACKAGES = ("corral", "trio", "msgspec", "mlx", "mlx-lm", "numpy")


class Machine(msgspec.Struct, frozen=True):
    platform: str
    machine: str
    processor: str
    cpus: int
    python: str
    versions: dict[str, str]


class Goal(msgspec.Struct, frozen=True):
    """A target for one figure: `value <op> target`, and whether this run met it."""

    name: str
    value: float
    op: str
    target: float
    met: bool


def goal(name: str, value: float, op: str, target: float) -> Goal:
    met = value >= target if op == ">=" else value <= target
    return Goal(name, value, op, target, met)


def machine() -> Machine:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return Machine(platform=platform.platform(), machine=platform.machine(),
                   processor=platform.processor() or platform.machine(),
                   cpus=os.cpu_count() or 0, python=platform.python_version(),
                   versions=versions)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def write_result(name: str, parameters: Mapping[str, Any], results: Mapping[str, Any],
                 goals: Iterable[Goal] = (), *, directory: Path | None = None,
                 smoke: bool = False) -> Path:
    """Write ``<directory>/<name>.json`` with the machine, versions, parameters and results,
    and print where. With no `directory`, a full run writes to `RESULTS_DIR` and a smoke
    run to a new temporary directory: a smoke run never overwrites committed results."""
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="corral-bench-smoke-")) if smoke \
            else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "bench": name,
        "recorded_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "parameters": dict(parameters),
        "results": dict(results),
        "goals": list(goals),
    }
    path = directory / f"{name}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n")
    print(f"results: {path}")
    return path


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                goals: Iterable[Goal] = (), console: Console | None = None) -> None:
    """Print a table, then each goal, met or not. On a terminal the table fits its
    width; piped or redirected (and `COLUMNS` unset), it is as wide as its cells, so no
    cell is cut or wrapped."""
    console = console or report_console()
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(value) for value in row))
    console.print(table)
    for g in goals:
        mark = "[green]met[/]" if g.met else "[red]not met[/]"
        console.print(f"goal {g.name}: {g.value:.3g} {g.op} {g.target:g}: {mark}")


def report_console() -> Console:
    """A console for stdout that never cuts a table when stdout is not a terminal."""
    console = Console()
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(width=_UNBOUNDED)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
