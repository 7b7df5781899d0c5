"""The Makefile's installs (issue 23, item 8): `make serve` installs the package alone,
`make test` the dev and Ray extras; each is done once per pyproject.toml, and CI runs
`make test` only.

The targets run for real in a copy of the Makefile, against a `.venv` whose python,
corral, ruff and mypy are stubs that write down how they were called.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if shutil.which("make") is None:
    pytest.skip("make is not installed", allow_module_level=True)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "corral", "ruff", "mypy"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n')
        stub.chmod(0o755)
    return tmp_path


def _make(clone: Path, target: str) -> list[str]:
    calls = clone / "calls"
    calls.unlink(missing_ok=True)
    subprocess.run(["make", "-s", target], cwd=clone, check=True, capture_output=True,
                   timeout=60)
    return [line.rstrip() for line in calls.read_text().splitlines()] if calls.exists() else []


def test_serve_installs_the_package_alone_and_test_the_extras(clone: Path) -> None:
    assert _make(clone, "serve") == ["python -m pip install --quiet -e .",
                                     "corral fetch-default-model",
                                     "corral serve --http 127.0.0.1:8000"]
    assert _make(clone, "serve")[0] == "corral fetch-default-model"  # installed once
    calls = _make(clone, "test")
    assert calls[0] == "python -m pip install --quiet -e .[dev,ray]"
    assert calls[1:3] == ["ruff check src", "mypy"]
    assert _make(clone, "test")[0] == "ruff check src"
    # The extras hold the package: serve needs no install after test.
    assert _make(clone, "serve")[0] == "corral fetch-default-model"
    # An edit of pyproject.toml installs again, each its own way.
    with open(clone / "pyproject.toml", "a") as file:
        file.write("\n# edited\n")
    assert _make(clone, "serve")[0] == "python -m pip install --quiet -e ."
    assert _make(clone, "test")[0] == "python -m pip install --quiet -e .[dev,ray]"


def test_a_fresh_clone_bootstraps_the_venv() -> None:
    dry = subprocess.run(["make", "-n", "-B", "serve", "PYTHON=python3"], cwd=ROOT,
                         check=True, capture_output=True, text=True, timeout=60).stdout
    assert "python3 -m venv .venv" in dry
    assert "pip install --quiet -e .\n" in dry and "[dev" not in dry


def test_ci_runs_make_test_only() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert [line for line in lines if "make" in line] == ["make test"]
