"""`corral bench blas`: MLX on the wheel's reference BLAS against MLX on numpy's OpenBLAS
through corral's shim (`corral.engine.blas`), and numpy as the machine's limit, in one run.

Each way runs in a process of its own (the BLAS is chosen when a process loads MLX):
``reference`` (no preload), ``shim`` (the environment a worker process gets, one
OpenBLAS thread unless OPENBLAS_NUM_THREADS says otherwise) and, on a machine with more
than one core, ``shim, N threads`` (OpenBLAS on every core). Each process measures:
- numpy: a 660×576×1536 fp32 matmul (GFLOP/s) and a gemv of SmolLM2's output layer,
  49152×576 fp32 (GB/s of weights read), with numpy's own threads;
- MLX: the same matmul and gemv;
- for each ``--model DIR``: prefill tokens/s (one prompt, chunks of 512) and decode
  tokens/s (one sequence, greedy, with `mlx_lm.generate.generate_step`).
Rounds visit the ways in turn, so drift hits all of them; figures are medians. The
machine's load average is recorded beside them. The shim's numerical results are the
tests' business (tests/test_blas.py); this only measures.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from corral.bench.report import print_table, write_result
from corral.engine.blas import reference_blas, shim_path, worker_environment
from corral.engine.mlx_import import import_mlx_lm

__all__ = ["main"]

_MATMUL: Final = (660, 576, 1536)
_GEMV: Final = (49152, 576)
_SMOKE_MATMUL: Final = (64, 64, 64)
_SMOKE_GEMV: Final = (1024, 64)
_PREFILL_CHUNK: Final = 512
_LABELS: Final = {
    "numpy_matmul_gflops": "numpy matmul GFLOP/s",
    "numpy_gemv_gbs": "numpy gemv GB/s",
    "mlx_matmul_gflops": "MLX matmul GFLOP/s",
    "mlx_gemv_gbs": "MLX gemv GB/s",
    "prefill_tokens_per_s": "prefill tokens/s",
    "decode_tokens_per_s": "decode tokens/s",
}


class _Probe(msgspec.Struct, frozen=True):
    """What one probe process measures (sent to it as JSON on its command line)."""

    matmul: tuple[int, int, int]
    gemv: tuple[int, int]
    repeats: int
    models: tuple[str, ...]
    prompt_tokens: int
    decode_tokens: int


def _ways() -> dict[str, dict[str, str]]:
    """Each way's environment, by name; only ``reference`` where there is no shim."""
    reference = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    ways = {"reference": reference}
    shim = worker_environment("auto", environ=reference)
    if shim is not None:
        ways["shim"] = shim
        cores = os.cpu_count() or 1
        if cores > 1:
            ways[f"shim, {cores} threads"] = {**shim, "OPENBLAS_NUM_THREADS": str(cores)}
    return ways


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _median_time(run: Callable[[], object], repeats: int) -> float:
    run()
    run()
    return statistics.median(_seconds(run) for _ in range(repeats))


def _measure(probe: _Probe) -> dict[str, float]:
    """The figures of this process's BLAS (run in a subprocess per way)."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    repeats = probe.repeats
    m, k, n = probe.matmul
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    rows, cols = probe.gemv
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x = rng.standard_normal((1, cols), dtype=np.float32)
    ma, mb, mw, mx_ = mx.array(a), mx.array(b), mx.array(w), mx.array(x)
    flops, weight_gb = 2.0 * m * k * n / 1e9, w.nbytes / 1e9
    figures = {
        "numpy_matmul_gflops": flops / _median_time(lambda: a @ b, repeats),
        "numpy_gemv_gbs": weight_gb / _median_time(lambda: x @ w.T, repeats),
        "mlx_matmul_gflops": flops / _median_time(lambda: mx.eval(ma @ mb), repeats),
        "mlx_gemv_gbs": weight_gb / _median_time(lambda: mx.eval(mx_ @ mw.T), repeats),
    }
    for model in probe.models:
        name = Path(model).name
        for key, value in _measure_model(model, probe.prompt_tokens,
                                         probe.decode_tokens).items():
            figures[f"{key} {name}"] = value
    return figures


def _measure_model(path: str, prompt_tokens: int, decode_tokens: int) -> dict[str, float]:
    import mlx.core as mx

    import_mlx_lm()
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(path)
    vocab = model.args.vocab_size
    prompt = mx.array([(1000 + i) % vocab for i in range(prompt_tokens)])

    def prefill() -> None:
        cache = make_prompt_cache(model)
        for start in range(0, prompt_tokens, _PREFILL_CHUNK):
            mx.eval(model(prompt[None, start:start + _PREFILL_CHUNK], cache=cache))

    def decode() -> float:
        first: float | None = None
        for _ in generate_step(prompt[:16], model, max_tokens=decode_tokens + 1):
            if first is None:  # the prompt's prefill ends with the first token
                first = time.perf_counter()
        assert first is not None
        return decode_tokens / (time.perf_counter() - first)

    prefill()
    return {"prefill_tokens_per_s": prompt_tokens / statistics.median(
                _seconds(prefill) for _ in range(2)),
            "decode_tokens_per_s": statistics.median(decode() for _ in range(3))}


def _run_probe(env: dict[str, str], probe: _Probe) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "corral.bench.blas", msgspec.json.encode(probe).decode()],
        env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {done.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return figures


def main(smoke: bool = False, output_dir: Path | None = None, models: Sequence[str] = (),
         prompt_tokens: int = 128, decode_tokens: int = 32) -> dict[str, Any]:
    """Run the BLAS benchmark, print its table and write ``blas.json``.

    Args:
        smoke: one round, small matrices (the models as given).
        output_dir: where the JSON goes (see `write_result`).
        models: MLX model directories to measure prefill and decode on.
        prompt_tokens: the prefill's prompt length.
        decode_tokens: tokens decoded per decode figure.
    """
    rounds = 1 if smoke else 3
    probe = _Probe(_SMOKE_MATMUL if smoke else _MATMUL, _SMOKE_GEMV if smoke else _GEMV,
                   3 if smoke else 15, tuple(models), prompt_tokens, decode_tokens)
    ways = _ways()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    loads: list[float] = []
    for _ in range(rounds):
        for name, env in ways.items():
            loads.append(os.getloadavg()[0])
            samples[name].append(_run_probe(env, probe))
    medians = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
               for name, runs in samples.items()}
    shim, reference = shim_path(), reference_blas()
    results: dict[str, Any] = {
        "ways": medians, "shim_path": None if shim is None else str(shim),
        "reference_blas": None if reference is None else str(reference),
        "load_average_1min": {"min": min(loads), "max": max(loads)}}
    print_table("corral bench blas", ["figure", *ways],
                [(_label(key), *(medians[name][key] for name in ways))
                 for key in medians["reference"]])
    print(f"load average (1 min) during the run: {min(loads):.2f} to {max(loads):.2f}")
    parameters = {**msgspec.structs.asdict(probe), "rounds": rounds, "ways": list(ways),
                  "smoke": smoke,
                  "openblas_num_threads": {name: env.get("OPENBLAS_NUM_THREADS")
                                           for name, env in ways.items()}}
    write_result("blas", parameters, results, directory=output_dir, smoke=smoke)
    return results


def _label(key: str) -> str:
    figure, _, model = key.partition(" ")
    return _LABELS[figure] + (f" ({model})" if model else "")


if __name__ == "__main__":
    print(json.dumps(_measure(msgspec.json.decode(sys.argv[1], type=_Probe))))
