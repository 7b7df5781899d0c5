"""Every `corral bench` runs in smoke mode and writes its JSON with results and goals.

Smoke runs check the harness, not the figures: a handful of iterations on a loaded
machine say nothing about whether a goal is met, so no test asserts that one is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral.bench import actors, generation, resilience


def _written(directory: Path, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / f"{name}.json").read_text())
    assert document["bench"] == name
    assert document["results"]
    assert document["goals"]
    for g in document["goals"]:
        assert set(g) == {"name", "value", "op", "target", "met"}
    return document


@pytest.mark.parametrize(("main", "names"), [
    (actors.main, ["actors"]),
    (resilience.main, ["resilience", "retry_storm"]),
], ids=["actors", "resilience"])
def test_a_smoke_run_writes_its_results(tmp_path: Path, main: Callable[..., dict[str, Any]],
                                        names: list[str]) -> None:
    main(smoke=True, output_dir=tmp_path)
    for name in names:
        _written(tmp_path, name)


@pytest.mark.slow
def test_the_generation_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    results = generation.main(smoke=True, output_dir=tmp_path)
    document = _written(tmp_path, "generation")
    assert document["results"] == json.loads(json.dumps(results))
    assert {g["name"] for g in document["goals"]} == {
        "single_decode_ratio", "batch_ratio", "late_join_steps_prefill_to_first_token",
        "aio_single_decode_ratio", "aio_batch_ratio", "structured_decode_ratio"}
    assert results["aio_single_decode_ratio"] > 0 and results["aio_batch_ratio"] > 0
    max_tokens = document["parameters"]["max_tokens"]
    assert all(0 < n <= max_tokens for n in results["single_tokens"])
    assert results["single_decode_ratio"] > 0
    assert results["batch_ratio"] > 0
    assert results["structured_decode_ratio"] > 0
    # Greedy records close where their grammar does, well before max_tokens.
    assert all(0 < n < 2048 for n in results["structured_tokens"])
    # Deterministic, whatever the machine: mlx_lm returns a prompt's first token in the
    # step after the one that ends its prefill, and a join stalls no decoding stream.
    assert results["late_join_steps_prefill_to_first_token_max"] == 1
    assert results["late_join_others_missed_tokens"] == 0


def test_the_resilience_run_has_the_asyncio_decorator_ratios(tmp_path: Path) -> None:
    resilience.main(smoke=True, output_dir=tmp_path)
    rows = {row["variant"]: row for row in _written(tmp_path, "resilience")["results"]["variants"]}
    assert rows["asyncio direct"]["ratio_to_direct"] == 1.0
    for name in ("@retry (asyncio)", "@circuit_breaker (asyncio)",
                 "@circuit_breaker @retry (asyncio)", "@retry (trio)"):
        assert rows[name]["ratio_to_direct"] > 0 and rows[name]["loop"] in ("trio", "asyncio")


def test_a_smoke_run_never_writes_the_committed_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # where benchmarks/results/ would be
    resilience.main(smoke=True)
    assert not (tmp_path / "benchmarks").exists()
    written = [Path(line.removeprefix("results: ")) for line in capsys.readouterr().out.splitlines()
               if line.startswith("results: ")]
    assert sorted(p.name for p in written) == ["resilience.json", "retry_storm.json"]
    for path in written:
        _written(path.parent, path.stem)
