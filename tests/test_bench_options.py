"""`corral bench serve`'s load options and its tables when piped (issue 23, item 9):
`--concurrency 1,4,16`, `--duration`, tables that are never cut when stdout is not a
terminal, and smoke runs that never write into benchmarks/results/."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from corral.bench import serve
from corral.bench.loadgen import Load, Target, random_prompts, run_load
from corral.bench.report import print_table, write_result
from corral.cli import app
from test_serve import Server, free_port


def test_a_piped_table_is_never_cut(capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    cells = ["corral (process, a long target name)", "12,345.6 (1.23x)", "x" * 60]
    print_table("a wide table", ["target", "output tok/s", "notes"], [cells] * 2)
    out = capsys.readouterr().out
    assert "…" not in out
    assert all(out.count(cell) == 2 for cell in cells)


def test_serve_loads_from_the_concurrency_list_and_the_duration() -> None:
    preset = [Load("concurrency", 96, concurrency=1), Load("concurrency", 256, concurrency=16),
              Load("poisson", 160, rate=10.0)]
    assert serve.serve_loads(preset) == preset
    assert serve.serve_loads(preset, [1, 4, 32]) == [
        Load("concurrency", 96, concurrency=1), Load("concurrency", 96, concurrency=4),
        Load("concurrency", 256, concurrency=32)]
    timed = serve.serve_loads(preset, duration_s=5.0)
    assert [load.duration_s for load in timed] == [5.0, 5.0, None]


def test_the_cli_passes_the_load_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve, "main", lambda **kwargs: seen.update(kwargs))
    runner = CliRunner()
    done = runner.invoke(app, ["bench", "serve", "--smoke", "--concurrency", "1,4,16",
                               "--duration", "3", "--model", "tiny"])
    assert done.exit_code == 0, done.output
    assert seen == {"smoke": True, "output_dir": None, "model": "tiny",
                    "concurrency": [1, 4, 16], "duration_s": 3.0, "ray_only": False}
    done = runner.invoke(app, ["bench", "serve", "--ray-only", "--concurrency", "4,16"])
    assert done.exit_code == 0, done.output
    assert seen["ray_only"] is True and seen["concurrency"] == [4, 16]
    done = runner.invoke(app, ["bench", "serve", "--concurrency", "4,0"])
    assert done.exit_code == 2
    assert "expected positive integers separated by commas" in done.output


def test_a_smoke_result_never_goes_to_the_committed_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_result("serve", {}, {}, smoke=True)
    assert not (tmp_path / "benchmarks").exists()
    assert path.name == "serve.json" and path.parent.name.startswith("corral-bench-smoke-")


@pytest.mark.slow
def test_a_timed_load_sends_until_its_time_is_up(model_path: str) -> None:
    port = free_port()
    server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"])
    try:
        server.wait_ready()
        target = Target("corral", f"http://127.0.0.1:{port}", "tiny")
        prompts = random_prompts(2, seed=1, min_words=2, max_words=4)
        load = Load("concurrency", 2, concurrency=2, duration_s=2.0)
        started = time.perf_counter()
        run = trio.run(lambda: run_load(target, prompts, load, max_tokens=4, timeout_s=30))
        assert time.perf_counter() - started >= 2.0
        # More requests than prompts: the load ran on the clock, not on a count.
        assert len(run.records) > len(prompts)
        assert [r.index for r in run.records] == list(range(len(run.records)))
        assert all(r.outcome == "completed" for r in run.records)
    finally:
        server.stop()
