"""Which BLAS MLX runs its matmuls on, on Linux: the wheel's reference BLAS, or numpy's
OpenBLAS through a small shim.

The `mlx[cpu]` wheel links the reference BLAS (``mlx_cpu.libs/libblas*``), ten to twenty
times slower than OpenBLAS. MLX calls only ``cblas_sgemm``, ``cblas_dgemm`` and
``cblas_cgemm`` from it. numpy's wheel bundles OpenBLAS under prefixed ILP64 names
(``scipy_cblas_sgemm64_``), so a shim of a dozen lines, compiled once with the machine's
C compiler into corral's cache, exports the three names and forwards them there. A
process that loads the shim before MLX resolves MLX's calls to it: a worker process
through ``LD_PRELOAD`` (`worker_environment`), the running process by a global `dlopen`
before MLX is imported (`load_in_process`).

Nothing here may fail a model: when the shim cannot be had (not Linux, no reference
BLAS, no numpy OpenBLAS, no compiler), one warning is logged and MLX keeps the BLAS it
links. On macOS (Accelerate) and with other wheels this module does nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

import structlog

__all__ = ["SHIM_SOURCE", "CpuBlas", "cache_directory", "load_in_process", "numpy_openblas",
           "reference_blas", "shim_path", "worker_environment"]

_log = structlog.get_logger("corral.blas")

CpuBlas = Literal["auto", "reference"]
"""``auto``: numpy's OpenBLAS through the shim where MLX links the reference BLAS;
``reference``: whatever MLX links, untouched."""

OPENBLAS_THREADS: Final = "1"
"""OpenBLAS threads in a process that uses the shim, unless OPENBLAS_NUM_THREADS is set.
One: MLX keeps a thread of its own busy, and OpenBLAS's idle threads spin (README,
"CPU speed on Linux")."""

_COMPILE_TIMEOUT_S: Final = 120.0

SHIM_SOURCE: Final = """\
/* corral: MLX's cblas_*gemm calls, forwarded to numpy's OpenBLAS (ILP64, prefixed).
   A row-major product with one row (x @ W.T, a decode step) goes to gemv: OpenBLAS's
   gemm packs the whole matrix first, which costs a second pass over it. */
typedef long long i64;
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

void scipy_cblas_sgemm64_(int, int, int, i64, i64, i64, float, const float *, i64,
                          const float *, i64, float, float *, i64);
void scipy_cblas_dgemm64_(int, int, int, i64, i64, i64, double, const double *, i64,
                          const double *, i64, double, double *, i64);
void scipy_cblas_cgemm64_(int, int, int, i64, i64, i64, const void *, const void *, i64,
                          const void *, i64, const void *, void *, i64);
void scipy_cblas_sgemv64_(int, int, i64, i64, float, const float *, i64, const float *,
                          i64, float, float *, i64);
void scipy_cblas_dgemv64_(int, int, i64, i64, double, const double *, i64,
                          const double *, i64, double, double *, i64);

static int one_row(int order, int tb, int m) {
  return order == ROW_MAJOR && m == 1 && (tb == NO_TRANS || tb == TRANS);
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta,
                 float *c, int ldc) {
  if (one_row(order, tb, m)) {
    i64 inc = ta == NO_TRANS ? 1 : lda;
    if (tb == NO_TRANS)
      scipy_cblas_sgemv64_(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc, beta, c, 1);
    else
      scipy_cblas_sgemv64_(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc, beta, c, 1);
    return;
  }
  scipy_cblas_sgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha,
                 const double *a, int lda, const double *b, int ldb, double beta,
                 double *c, int ldc) {
  if (one_row(order, tb, m)) {
    i64 inc = ta == NO_TRANS ? 1 : lda;
    if (tb == NO_TRANS)
      scipy_cblas_dgemv64_(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc, beta, c, 1);
    else
      scipy_cblas_dgemv64_(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc, beta, c, 1);
    return;
  }
  scipy_cblas_dgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int order, int ta, int tb, int m, int n, int k, const void *alpha,
                 const void *a, int lda, const void *b, int ldb, const void *beta,
                 void *c, int ldc) {
  scipy_cblas_cgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""
"""The shim's C source: MLX's three BLAS entry points, 32-bit ints widened to 64."""

_lock = threading.Lock()
_shims: dict[Path, Path | None] = {}  # cache directory -> the shim, or None: it failed
_loaded_here: Path | None = None  # the shim `load_in_process` loaded


def _package_file(distribution: str, prefix: str, name_start: str) -> Path | None:
    """The installed file of `distribution` under `prefix` whose name starts so."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        parts = file.parts
        if len(parts) == 2 and parts[0] == prefix and parts[1].startswith(name_start):
            path = Path(str(file.locate()))
            if path.is_file():
                return path.resolve()
    return None


def reference_blas() -> Path | None:
    """The reference BLAS the installed MLX links (Linux, the `mlx[cpu]` wheel), or None:
    another platform or wheel, whose BLAS this module leaves alone."""
    if not sys.platform.startswith("linux"):
        return None
    return _package_file("mlx-cpu", "mlx_cpu.libs", "libblas")


def numpy_openblas() -> Path | None:
    """numpy's bundled OpenBLAS (``numpy.libs/libscipy_openblas64_*.so``), or None."""
    return _package_file("numpy", "numpy.libs", "libscipy_openblas64_")


def cache_directory() -> Path:
    """Where corral keeps what it builds: ``$CORRAL_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/corral``, else ``~/.cache/corral``."""
    explicit = os.environ.get("CORRAL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "corral"


def shim_path(cache_dir: Path | None = None) -> Path | None:
    """The shim, built at its first use: None where MLX does not link the reference BLAS
    or the shim cannot be built.

    The file is named for the OpenBLAS it forwards to (path, size, mtime), the source
    and the compiler, so a new numpy builds a new one; it is written under a temporary
    name and renamed, so concurrent builders never see half a file. Thread-safe; the
    answer is kept for the life of the process.

    Args:
        cache_dir: where to build; `cache_directory()` / ``blas`` if None.

    Never raises: a failed build logs one warning (``blas.shim_unavailable``) and
    returns None, and so does every later call.
    """
    directory = cache_dir if cache_dir is not None else cache_directory() / "blas"
    with _lock:
        if directory not in _shims:
            _shims[directory] = _find_or_build(directory)
        return _shims[directory]


def _find_or_build(directory: Path) -> Path | None:
    if reference_blas() is None:
        return None
    openblas = numpy_openblas()
    if openblas is None:
        _log.warning("blas.shim_unavailable", reason="numpy's OpenBLAS not found",
                     blas="reference")
        return None
    compiler = shlex.split(os.environ.get("CC") or "cc")
    stat = openblas.stat()
    identity = "\0".join([str(openblas), str(stat.st_size), str(stat.st_mtime_ns),
                          SHIM_SOURCE, *compiler])
    target = directory / f"cblas-shim-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        _build(target, openblas, compiler)
    except (OSError, subprocess.SubprocessError) as exc:
        _log.warning("blas.shim_unavailable", reason="cannot build the shim",
                     error=str(exc).strip()[-500:], compiler=compiler, blas="reference")
        return None
    _log.info("blas.shim_built", path=str(target), openblas=str(openblas))
    return target


def _build(target: Path, openblas: Path, compiler: list[str]) -> None:
    """Compile the shim to `target` atomically.

    Raises:
        OSError: the directory or the compiler cannot be used.
        subprocess.SubprocessError: the compiler failed (its stderr is the message) or
            ran past `_COMPILE_TIMEOUT_S`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        source = Path(work) / "shim.c"
        source.write_text(SHIM_SOURCE)
        built = Path(work) / target.name
        command = [*compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(source),
                   str(openblas), f"-Wl,-rpath,{openblas.parent}", "-Wl,--no-undefined"]
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=_COMPILE_TIMEOUT_S)
        if done.returncode != 0 or not built.is_file():
            raise subprocess.SubprocessError(
                done.stderr or f"{compiler[0]} exited with status {done.returncode}")
        os.replace(built, target)


def _global_cblas() -> bool:
    """Whether this process's global symbol scope already has ``cblas_sgemm``: a BLAS
    the user preloaded (or our shim), which MLX resolves to before the reference one."""
    return hasattr(ctypes.CDLL(None), "cblas_sgemm")


def worker_environment(cpu_blas: CpuBlas, cache_dir: Path | None = None,
                       environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The environment a worker process should start with, or None to inherit this one.

    With ``auto`` and a shim at hand: this environment with the shim first in
    ``LD_PRELOAD``, and ``OPENBLAS_NUM_THREADS`` (`OPENBLAS_THREADS`) unless set. None
    with ``reference``, where there is no shim, or where the user preloaded a BLAS of
    their own (it is inherited). May build the shim (see `shim_path`): call it off the
    event loop the first time. Never raises.

    Args:
        cpu_blas: the ``generation.cpu_blas`` setting.
        cache_dir: where the shim is built (see `shim_path`).
        environ: the environment to extend; `os.environ` if None.
    """
    if cpu_blas == "reference":
        return None
    if _loaded_here is None and _global_cblas():
        return None
    shim = shim_path(cache_dir)
    if shim is None:
        return None
    env = dict(os.environ if environ is None else environ)
    preload = [entry for entry in env.get("LD_PRELOAD", "").split() if entry != str(shim)]
    env["LD_PRELOAD"] = " ".join([str(shim), *preload])
    env.setdefault("OPENBLAS_NUM_THREADS", OPENBLAS_THREADS)
    return env


def load_in_process(cpu_blas: CpuBlas, cache_dir: Path | None = None) -> Path | None:
    """Make MLX in this process use the shim: load it into the global symbol scope,
    which MLX's library consults before its own reference BLAS. For the thread engine.

    It must run before ``mlx.core`` is first imported: after that, MLX's calls are bound
    and this logs a warning and does nothing. It sets ``OPENBLAS_NUM_THREADS`` (unless
    set) first, which this process's OpenBLAS, numpy's included, then reads.

    Args:
        cpu_blas: the ``generation.cpu_blas`` setting; ``reference`` does nothing.
        cache_dir: where the shim is built (see `shim_path`).

    Returns:
        The shim now loaded, or None if nothing was loaded. Never raises.
    """
    global _loaded_here
    if cpu_blas == "reference":
        return None
    if _loaded_here is not None:
        return _loaded_here
    if _global_cblas():
        return None
    shim = shim_path(cache_dir)
    if shim is None:
        return None
    if "mlx.core" in sys.modules:
        _log.warning("blas.too_late", reason="mlx.core is imported already", blas="reference")
        return None
    os.environ.setdefault("OPENBLAS_NUM_THREADS", OPENBLAS_THREADS)
    try:
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _log.warning("blas.shim_unavailable", reason="cannot load the shim", error=str(exc),
                     blas="reference")
        return None
    _loaded_here = shim
    return shim
