"""`corral serve` exits 0, cleanly, however it is stopped: real processes, real signals.

An MLX engine thread runs thread-local destructors that call into Python after the
thread looks finished; an interpreter finalizing under them aborted the process (exit
134, "terminate called without an active exception") in about one SIGTERM in twenty.
These runs put real work through the server first (long and short prompts, streamed
and not), in both isolations, then stop it with SIGTERM, and with SIGINT right after
its banner. Every wait is bounded; the server only listens on 127.0.0.1.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from test_serve import free_port

pytestmark = pytest.mark.slow

LONG_PROMPT = " ".join(["the river runs through the valley"] * 140)  # about 1,960 tokens
RUNS = [(isolation, run) for isolation in ("thread", "process") for run in range(5)]


def _start(model_path: str, isolation: str, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    config = tmp_path / "runtime.yaml"
    config.write_text(f"generation:\n  isolation: {isolation}\n"
                      "server:\n  drain_timeout_ms: 5000\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "serve", "--model", f"tiny={model_path}",
         "--port", str(port), "--config", str(config), "--log-level", "warning"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    return process, port


def _read_until(process: subprocess.Popen[str], lines: list[str],
                prefix: str = "corral serving") -> threading.Thread:
    """Read stderr into `lines` in a thread; return once a line starts with `prefix`."""
    seen = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                seen.set()
        seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(60), lines[-20:]
    assert any(line.startswith(prefix) for line in lines), lines[-20:]
    return reader


def _load(base: str) -> None:
    """Long and short prompts, streamed and not, all at once; each must complete."""
    def one(prompt: str, stream: bool) -> None:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "stream": stream}
        with httpx.Client(timeout=120) as client:
            if stream:
                with client.stream("POST", f"{base}/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    assert any(line == "data: [DONE]" for line in response.iter_lines())
            else:
                response = client.post(f"{base}/v1/completions", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] == 8

    errors: list[BaseException] = []

    def guarded(prompt: str, stream: bool) -> None:
        try:
            one(prompt, stream)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(prompt, stream))
               for prompt in (LONG_PROMPT, "The quick brown fox") for stream in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors


def _assert_clean_exit(process: subprocess.Popen[str], reader: threading.Thread,
                       lines: list[str]) -> None:
    code = process.wait(timeout=60)
    reader.join(10)
    assert code == 0, lines[-20:]
    assert not [line for line in lines if "terminate called" in line], lines[-20:]


@pytest.mark.parametrize(("isolation", "run"), RUNS,
                         ids=[f"{isolation}-{run}" for isolation, run in RUNS])
def test_sigterm_after_a_mixed_load_exits_0(model_path: str, tmp_path: Path,
                                            isolation: str, run: int) -> None:
    process, port = _start(model_path, isolation, tmp_path)
    try:
        lines: list[str] = []
        reader = _read_until(process, lines)
        _load(f"http://127.0.0.1:{port}")
        process.send_signal(signal.SIGTERM)
        _assert_clean_exit(process, reader, lines)
        assert "corral: shutting down, draining open streams" in lines
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize("isolation", ["thread", "process", "thread", "process", "thread"])
def test_sigint_right_after_the_banner_drains_and_exits_0(
        model_path: str, tmp_path: Path, isolation: str) -> None:
    process, _ = _start(model_path, isolation, tmp_path)
    try:
        lines: list[str] = []
        reader = _read_until(process, lines)
        process.send_signal(signal.SIGINT)
        _assert_clean_exit(process, reader, lines)
        assert "corral: shutting down, draining open streams" in lines
    finally:
        process.kill()
        process.wait(timeout=30)


def test_a_signal_while_the_model_loads_exits_0_without_serving(
        model_path: str, tmp_path: Path) -> None:
    process, _ = _start(model_path, "process", tmp_path)
    try:
        lines: list[str] = []
        reader = _read_until(process, lines, "loading tiny")
        process.send_signal(signal.SIGTERM)
        _assert_clean_exit(process, reader, lines)
        assert not [line for line in lines if line.startswith("corral serving")] or \
            "corral: shutting down, draining open streams" in lines
    finally:
        process.kill()
        process.wait(timeout=30)
