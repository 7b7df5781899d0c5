"""Tests for corral.engine.blas: the BLAS shim is built, loaded where it should be, gives
numpy's results, and its absence never fails a model.

Processes are real (LD_PRELOAD and a global dlopen act on a whole process); whether the
shim is in one is read from /proc/PID/maps. Nothing here asserts speed: `corral bench
blas` measures that.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import structlog
import trio

from corral.bench import blas as blas_bench
from corral.engine.blas import (
    load_in_process,
    reference_blas,
    shim_path,
    worker_environment,
)
from test_process_engine import Recorder, open_process_engine, seq
from test_serve import Server, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(reference_blas() is None,
                       reason="MLX here does not link the reference BLAS: nothing to replace"),
]

# a @ b for each dtype MLX sends to BLAS, plain and transposed, against numpy, in the
# process that runs it; it prints whether the shim is mapped into that process.
MATMUL = textwrap.dedent("""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    for dtype, np_dtype in ((mx.float32, np.float32), (mx.float64, np.float64),
                            (mx.complex64, np.complex64)):
        a = rng.standard_normal((67, 45)).astype(np_dtype)
        b = rng.standard_normal((45, 131)).astype(np_dtype)
        if np_dtype is np.complex64:
            a = a + 1j * rng.standard_normal(a.shape).astype(np.float32)
            b = b - 1j * rng.standard_normal(b.shape).astype(np.float32)
        x, y = mx.array(a, dtype=dtype), mx.array(b, dtype=dtype)
        for (left, right), want in (((x, y), a @ b), ((x.T, x), a.T @ a), ((y, y.T), b @ b.T)):
            got = np.array(mx.matmul(left, right, stream=mx.cpu))
            assert got.dtype == want.dtype, (got.dtype, want.dtype)
            assert np.allclose(got, want, rtol=1e-4, atol=1e-4), dtype
    maps = open("/proc/self/maps").read()
    print("shim" if "cblas-shim-" in maps else "no shim")
""")


def _run(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]  # its answer, after any log line


def _mapped(pid: int, path: Path) -> bool:
    return str(path) in Path(f"/proc/{pid}/maps").read_text()


def test_the_shim_is_built_once_into_the_cache(tmp_path: Path) -> None:
    shim = shim_path(tmp_path)
    assert shim is not None and shim.parent == tmp_path and shim.is_file()
    assert shim_path(tmp_path) == shim
    assert [p.name for p in tmp_path.iterdir()] == [shim.name]  # no build leftovers


def test_a_process_started_with_the_worker_environment_uses_the_shim_and_equals_numpy(
        tmp_path: Path) -> None:
    env = worker_environment("auto", cache_dir=tmp_path)
    assert env is not None
    shim = shim_path(tmp_path)
    assert env["LD_PRELOAD"].split()[0] == str(shim)
    assert _run(MATMUL, env) == "shim"
    assert _run(MATMUL) == "no shim"  # the reference BLAS gives the same results
    assert worker_environment("reference", cache_dir=tmp_path) is None


def test_a_process_that_preloads_a_blas_passes_it_on_unchanged(tmp_path: Path) -> None:
    env = worker_environment("auto", cache_dir=tmp_path)
    assert env is not None
    code = ("from pathlib import Path; from corral.engine.blas import worker_environment; "
            f"print(worker_environment('auto', cache_dir=Path({str(tmp_path)!r})))")
    assert _run(code, env) == "None"


def test_load_in_process_before_mlx_makes_this_process_use_the_shim(tmp_path: Path) -> None:
    before = (f"from pathlib import Path; from corral.engine.blas import load_in_process; "
              f"assert load_in_process('auto', Path({str(tmp_path)!r})) is not None\n")
    assert _run(before + MATMUL) == "shim"
    late = ("import mlx.core; from pathlib import Path; "
            "from corral.engine.blas import load_in_process; "
            f"print(load_in_process('auto', Path({str(tmp_path)!r})))")
    assert _run(late) == "None"


async def test_a_worker_process_runs_with_the_shim(
        model_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    shim = await trio.to_thread.run_sync(shim_path, tmp_path / "blas")
    assert shim is not None
    recorder = Recorder()
    async with open_process_engine(model_path, recorder) as engine:
        assert engine.pid is not None and _mapped(engine.pid, shim)
        engine.submit(seq(0, [1, 2, 3]))
        await recorder.wait_finished(0)
    async with open_process_engine(model_path, Recorder(), cpu_blas="reference") as engine:
        assert engine.pid is not None and not _mapped(engine.pid, shim)


async def test_without_a_compiler_the_model_serves_on_the_reference_blas(
        model_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    with structlog.testing.capture_logs() as logs:
        assert worker_environment("auto") is None
        assert worker_environment("auto") is None  # one warning, not one per worker
    assert [e["event"] for e in logs] == ["blas.shim_unavailable"]
    assert logs[0]["log_level"] == "warning" and logs[0]["blas"] == "reference"
    recorder = Recorder()
    async with open_process_engine(model_path, recorder) as engine:
        engine.submit(seq(0, [1, 2, 3], max_tokens=4))
        await recorder.wait_finished(0)
        assert engine.pid is not None
        assert "cblas-shim-" not in Path(f"/proc/{engine.pid}/maps").read_text()
    assert recorder.tokens[0] and recorder.failures == []
    assert not any(tmp_path.rglob("*.so"))


def test_corral_serve_with_thread_isolation_loads_the_shim_in_its_own_process(
        model_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{free_port()}"])
    try:
        server.wait_ready()
        shim = shim_path(tmp_path / "blas")
        assert shim is not None and _mapped(server.process.pid, shim)
    finally:
        server.stop()


def test_load_in_process_with_reference_loads_nothing() -> None:
    assert load_in_process("reference") is None


def test_the_bench_smoke_run_measures_every_way(model_path: str, tmp_path: Path) -> None:
    results = blas_bench.main(smoke=True, output_dir=tmp_path / "out", models=[model_path],
                              prompt_tokens=16, decode_tokens=4)
    document = json.loads((tmp_path / "out" / "blas.json").read_text())
    assert document["bench"] == "blas" and document["parameters"]["smoke"]
    assert set(results["ways"]) >= {"reference", "shim"}
    for figures in results["ways"].values():
        assert all(value > 0 for value in figures.values())
        assert {"mlx_matmul_gflops", f"decode_tokens_per_s {Path(model_path).name}"} \
            <= set(figures)


@pytest.mark.parametrize("ta", [111, 112])
@pytest.mark.parametrize("tb", [111, 112])
@pytest.mark.parametrize("m", [1, 3])
def test_the_shim_sgemm_equals_numpy_and_ignores_c_when_beta_is_0(
        tmp_path: Path, ta: int, tb: int, m: int) -> None:
    """Through the C entry point MLX calls, row-major (101), with C full of NaN as MLX's
    fresh buffers may be: one-row products take the gemv path, the others gemm."""
    shim = shim_path(tmp_path)
    assert shim is not None
    sgemm = ctypes.CDLL(str(shim)).cblas_sgemm
    i32, ptr, f32 = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    sgemm.argtypes = [i32, i32, i32, i32, i32, i32, f32, ptr, i32, ptr, i32, f32, ptr, i32]
    rng = np.random.default_rng(m)
    k, n = 37, 53
    a = rng.standard_normal((m, k) if ta == 111 else (k, m), dtype=np.float32)
    b = rng.standard_normal((k, n) if tb == 111 else (n, k), dtype=np.float32)
    c = np.full((m, n), np.nan, dtype=np.float32)
    sgemm(101, ta, tb, m, n, k, 1.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1],
          0.0, c.ctypes.data, n)
    want = (a if ta == 111 else a.T) @ (b if tb == 111 else b.T)
    assert np.allclose(c, want, rtol=1e-5, atol=1e-5)
