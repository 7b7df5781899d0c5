"""`corral bench serve`, `prefix-cache`, `chaos` and `plot` in smoke mode, so the
harness cannot rot.

Each starts real servers (`corral serve` twice, `mlx_lm.server`) on 127.0.0.1 with the
tiny model and sends a handful of requests. They check the harness, not the figures: no
assertion here depends on the machine's speed. Chaos is the exception that is not a
speed figure: a killed worker must lose and hang no request, whatever the machine.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from corral.bench import chaos, plot, prefix_cache, serve

pytestmark = pytest.mark.slow


def _document(directory: Path, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / f"{name}.json").read_text())
    assert document["bench"] == name
    assert document["parameters"]["smoke"] is True
    assert document["machine"]["versions"]["mlx-lm"]
    for g in document["goals"]:
        assert set(g) == {"name", "value", "op", "target", "met"}
    return document


@pytest.fixture(scope="module")
def serve_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench-serve")
    serve.main(smoke=True, output_dir=directory)
    return directory


def test_serve_measures_every_target_under_every_load(serve_results: Path) -> None:
    document = _document(serve_results, "serve")
    results = document["results"]
    assert results["loads"] == ["c=1", "c=2", "20 req/s"]
    assert set(results["runs"]) == {"mlx_lm.server", "corral (defaults)", "corral (thread)",
                                    "corral (process)", "raw mlx_lm"}
    if importlib.util.find_spec("ray") is not None:
        # The Ray hop's cost, in its own phase: against one corral serve of that phase.
        hop = results["ray_hop"]["runs"]
        assert set(hop) == {serve.DEFAULTS, serve.RAY}
        assert all(s["completed"] == s["requests"] > 0
                   for by_load in hop.values() for s in by_load.values())
        assert set(results["ray_ratio"]) == set(results["loads"])
        assert all(ratio > 0 for ratio in results["ray_ratio"].values())
        assert set(results["ray_ttft_ratio"]) == set(results["loads"])
    for target, by_load in results["runs"].items():
        assert list(by_load) == results["loads"], target
        for label, summary in by_load.items():
            assert summary["completed"] == summary["requests"] > 0, (target, label, summary)
            assert summary["output_tokens"] > 0
            for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
                assert set(summary[key]) == {"mean", "p50", "p90", "p99"}
                assert 0 < summary[key]["p50"] <= summary[key]["p99"]
            assert results["ratios"][target][label]["output_throughput"] > 0
    assert all(ratio == 1.0 for ratio in results["ratios"]["mlx_lm.server"]["c=1"].values())
    # Every server was stopped and reaped.
    assert all(code is not None for code in results["exit_codes"].values())
    assert {g["name"] for g in document["goals"]} >= {
        "corral (thread) c=1 output throughput / mlx_lm.server",
        "mlx_lm.server requests not completed"}


def test_plot_draws_the_serve_charts(serve_results: Path, tmp_path: Path) -> None:
    written = plot.main(results_dir=serve_results, output_dir=tmp_path)
    assert {p.name for p in written} == {"serve_latency.png", "serve_throughput.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chaos_loses_and_hangs_no_request_when_the_worker_is_killed(tmp_path: Path) -> None:
    chaos.main(smoke=True, output_dir=tmp_path)
    document = _document(tmp_path, "chaos")
    runs = document["results"]["runs"]
    assert set(runs) == {"none", "SIGKILL", "SIGSEGV"}
    for name in ("SIGKILL", "SIGSEGV"):
        run = runs[name]
        assert run["kills"] == 1, run
        assert run["lost"] == 0, run
        assert run["hung"] == 0, run
        assert run["completed"] + run["failed"] == run["requests"]
        assert run["restarts"] >= 1
    assert document["results"]["server_survived"] is True
    written = plot.main(results_dir=tmp_path, output_dir=tmp_path)
    assert [p.name for p in written] == ["chaos.png"]


def test_prefix_cache_runs_the_chat_and_the_resume_against_every_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a smoke run must not write benchmarks/results/
    results = prefix_cache.main(smoke=True)
    assert not (tmp_path / "benchmarks").exists()
    chat = results["chat"]
    assert set(chat) == {"mlx_lm.server", "corral serve", "corral serve, prefix cache off"}
    for target, summary in chat.items():
        assert summary["completed"] == summary["requests"] == 4, (target, summary)
        assert 0 < summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p99"]
    # The second turn resends the first: both caches must hit, and the one switched
    # off must not.
    assert chat["corral serve"]["cached_tokens"] > 0
    assert chat["mlx_lm.server"]["cached_tokens"] > 0
    assert chat["corral serve, prefix cache off"]["cached_tokens"] == 0
    resume = results["resume"]
    for variant in ("with disk tier", "without disk tier"):
        assert all(gap > 0 for gap in resume[variant]["kill_to_next_token_s"])
