"""The docs' snippets, run as written (issue 23): README.md and docs/*.md.

- Every fenced `yaml` block passes `corral check-config`. Every one that lists models
  is also served by a real `corral serve --config`, with each `generation.models[].path`
  replaced by the tiny model's directory (the only change; aliases and fallbacks stay as
  written, so a model listed before its fallback must serve).
- Every fenced `python` block compiles. The ones that need no server and no model but
  the tiny one run, each in its own interpreter. The client ones (OpenAI, Anthropic,
  Ollama) run against a `corral serve` that serves the tiny model under the alias they
  name (`smollm2`), with only the port of their address changed: each block that makes
  its `client` in an interpreter of its own, and the blocks that only use `client`
  after the first OpenAI one, in document order. A block that names another model (a
  `qwen` with tools) is compiled only.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from test_serve import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)
_SERVER = "127.0.0.1:8000"


class Snippet:
    def __init__(self, path: Path, line: int, text: str) -> None:
        self.path, self.line, self.text = path, line, text

    def __repr__(self) -> str:
        return f"{self.path.name}:{self.line}"


def snippets(language: str) -> list[Snippet]:
    found = []
    for path in DOCS:
        document = path.read_text(encoding="utf-8")
        for match in _FENCE.finditer(document):
            if match.group(2) == language:
                line = document.count("\n", 0, match.start()) + 1
                found.append(Snippet(path, line, textwrap.dedent(match.group(3))))
    return found


YAML = snippets("yaml")
PYTHON = snippets("python")
SERVED_YAML = [s for s in YAML if (yaml.safe_load(s.text) or {}).get("generation", {})
               .get("models")]
CLIENT = [s for s in PYTHON if "client" in s.text]
OFFLINE = [s for s in PYTHON if s not in CLIENT]


def test_the_snippets_are_found() -> None:
    assert len(YAML) >= 2 and len(SERVED_YAML) >= 2
    assert len(PYTHON) >= 8 and len(OFFLINE) >= 3 and len(CLIENT) >= 5


@pytest.mark.parametrize("snippet", YAML, ids=repr)
def test_yaml_passes_check_config(snippet: Snippet, tmp_path: Path) -> None:
    path = tmp_path / "snippet.yaml"
    path.write_text(snippet.text, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "corral.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("snippet", SERVED_YAML, ids=repr)
def test_yaml_with_models_serves(snippet: Snippet, tmp_path: Path, model_path: str) -> None:
    data: dict[str, Any] = yaml.safe_load(snippet.text)
    for model in data["generation"]["models"]:
        model["path"] = model_path
    config = tmp_path / "snippet.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    port = free_port()
    server = Server(["--http", f"127.0.0.1:{port}"], config)
    try:
        server.wait_ready()
        base = f"http://127.0.0.1:{port}"
        aliases = [model["alias"] for model in data["generation"]["models"]]
        served = [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]]
        assert sorted(served) == sorted(aliases)
        reply = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={"model": aliases[0], "prompt": "Hi", "max_tokens": 2})
        assert reply.status_code == 200, reply.text
    finally:
        server.stop()


@pytest.mark.parametrize("snippet", PYTHON, ids=repr)
def test_python_compiles(snippet: Snippet) -> None:
    compile(snippet.text, repr(snippet), "exec")


@pytest.mark.slow
@pytest.mark.parametrize("snippet", OFFLINE, ids=repr)
def test_offline_python_runs(snippet: Snippet) -> None:
    done = subprocess.run([sys.executable, "-c", snippet.text], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def _runs_offline(snippet: Snippet) -> bool:
    return set(re.findall(r'model="([^"]+)"', snippet.text)) <= {"smollm2"}


def _makes_a_client(snippet: Snippet) -> bool:
    return re.search(r"^client = ", snippet.text, re.MULTILINE) is not None


def client_scripts() -> list[tuple[list[Snippet], str]]:
    """The client blocks as scripts: each block that makes its `client` alone, except
    the first (the OpenAI client of Serving), which the blocks that only use `client`
    follow, as they do in the text."""
    runnable = [s for s in CLIENT if _runs_offline(s)]
    makers = [s for s in runnable if _makes_a_client(s)]
    scripts = [[makers[0], *(s for s in runnable if not _makes_a_client(s))],
               *([maker] for maker in makers[1:])]
    return [(blocks, "\n".join(s.text for s in blocks)) for blocks in scripts]


@pytest.mark.slow
def test_client_python_runs_against_corral_serve(model_path: str) -> None:
    scripts = client_scripts()
    assert "OpenAI(" in scripts[0][1] and len(scripts[0][0]) >= 4
    assert all(_SERVER in script for _, script in scripts)
    port = free_port()
    server = Server(["--model", f"smollm2={model_path}", "--http", f"127.0.0.1:{port}"])
    try:
        server.wait_ready()
        for blocks, script in scripts:
            done = subprocess.run(
                [sys.executable, "-c", script.replace(_SERVER, f"127.0.0.1:{port}")],
                capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (blocks, done.stderr[-3000:])
    finally:
        server.stop()
