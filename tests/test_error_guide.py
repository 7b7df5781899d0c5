"""docs/error-handling.md: its generated tables match the code, its troubleshooting
section names log events corral really emits, and its five examples run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from corral.cli import app
from corral.error_guide import CONFIG_SECTIONS, code_table, config_keys, render
from corral.protocol.errors import ERROR_TABLE

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "error-handling.md"
CONFIG = ROOT / "config" / "runtime.yaml"
EXAMPLES = ROOT / "docs" / "examples"


def test_the_guide_is_what_the_generator_renders() -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    assert render(guide, CONFIG.read_text(encoding="utf-8")) == guide, \
        "run `corral docs errors` and commit docs/error-handling.md"


def test_the_check_command_fails_on_a_stale_guide(tmp_path: Path) -> None:
    stale = tmp_path / "guide.md"
    stale.write_text(GUIDE.read_text(encoding="utf-8").replace("| `Overloaded` | -32006",
                                                               "| `Overloaded` | -1"))
    runner = CliRunner()
    args = ["docs", "errors", "--guide", str(stale), "--config", str(CONFIG)]
    assert runner.invoke(app, [*args, "--check"]).exit_code == 1
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--check"]).exit_code == 0


def test_every_code_and_every_listed_key_is_in_the_guide() -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    for code, spec in ERROR_TABLE.items():
        assert f"| `{code.value}` | {spec.jsonrpc} | {spec.http} |" in guide
    keys = config_keys(CONFIG.read_text(encoding="utf-8"))
    assert keys["calls.retry"][0][0] == "max_attempts"
    for section in CONFIG_SECTIONS:
        assert keys[section], section
        for key, _, doc in keys[section]:
            assert doc, f"{section}.{key} has no comment in runtime.yaml"
            assert f"| `{key}` |" in guide
    assert code_table().count("\n") == len(ERROR_TABLE) + 1


def test_troubleshooting_names_only_events_corral_emits() -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    section = guide[guide.index("## Troubleshooting"):guide.index("## The toolkit")]
    events = set(re.findall(r"^\[\w+\s*\] ([a-z_.]+) ", section, re.MULTILINE))
    assert {"breaker.transition", "retry.budget_exhausted", "http.request",
            "process_engine.worker_exited", "supervisor.intensity_exceeded",
            "runtime.model_failed"} <= events
    source = "\n".join(p.read_text(encoding="utf-8")
                       for p in (ROOT / "src" / "corral").rglob("*.py"))
    for event in events:
        name = event.split(".", 1)[1] if event.startswith("supervisor.") else event
        assert f'"{name}"' in source, f"{event} is not an event corral logs"


def _run(example: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(EXAMPLES / example), *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("ok"), done.stdout
    return done.stdout


def test_example_1_retry_decorator() -> None:
    out = _run("retry_decorator.py")
    assert "ACME: 101.5" in out and out.count("retrying in") == 2
    assert "not retried: ValueError" in out


def test_example_2_asyncio_service() -> None:
    out = _run("asyncio_service.py")
    assert "greeter says hi" in out
    assert "call 2: failed fast" in out
    # The toolkit logs through the host's `logging`, which this example leaves alone.
    assert "breaker.transition" not in out


def test_example_3_fallback_chain() -> None:
    out = _run("fallback_chain.py")
    assert "GBP while down (cached): 1.27" in out and "JPY while down (default): None" in out


@pytest.mark.slow
def test_example_4_embedded_overload(model_path: str) -> None:
    out = _run("embedded_overload.py", model_path)
    assert out.count(": 8 tokens") == 3
    assert "InvalidParams (HTTP 400, JSON-RPC -32602)" in out


@pytest.mark.slow
def test_example_5_server_fallbacks(model_path: str) -> None:
    out = _run("server_fallbacks.py", model_path)
    assert "(fallback=cached)" in out and "(fallback=default)" in out
