"""`corral serve` as its users run it: a real process, real signals, real clients.

Every wait is bounded; the server only ever listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from corral.tiny import make_tiny_model

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A `corral serve` subprocess; stderr is collected line by line."""

    def __init__(self, args: list[str], config: Path | None = None,
                 env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        command = [sys.executable, "-m", "corral.cli", "serve", *args]
        if config is not None:
            command += ["--config", str(config)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, **(env or {})},
                                        preexec_fn=preexec_fn)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("corral serving"):
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> None:
        assert self._ready.wait(60), self.lines[-20:]
        assert any(line.startswith("corral serving") for line in self.lines), self.lines[-20:]

    def said(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(timeout=30)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "runtime.yaml"
    path.write_text("server:\n  drain_timeout_ms: 1500\n"
                    "stream_registry:\n  max_active_streams: 16\n"
                    "logging:\n  format: json\n")
    return path


def test_serve_starts_answers_and_exits_0_on_sigterm(model_path: str, config_file: Path) -> None:
    port = free_port()
    server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"],
                    config_file)
    try:
        server.wait_ready()
        assert f"http://127.0.0.1:{port}" in server.said("corral serving")[0]
        assert "tiny" in server.said("corral serving")[0]
        base = f"http://127.0.0.1:{port}"
        models = httpx.get(f"{base}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        reply = httpx.post(f"{base}/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 5}).json()
        assert reply["usage"]["completion_tokens"] == 5
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


@contextlib.contextmanager
def serve_process(model_path: str) -> Iterator[openai.OpenAI]:
    """A `corral serve` process serving the model as `tiny` on a free port of
    127.0.0.1, and the official client for it; the process is stopped after."""
    port = free_port()
    server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"])
    try:
        server.wait_ready()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0) as client:
            yield client
    finally:
        server.stop()


def _stream(base: str, max_tokens: int, events: list[Any]) -> None:
    body = {"model": "tiny", "prompt": "The river", "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))


def test_sigterm_during_8_streams_each_finishes_or_gets_the_typed_shutdown_error(
        tmp_path: Path, config_file: Path) -> None:
    # A context long enough for streams that outlast the drain by far.
    long_context = make_tiny_model(tmp_path / "long", context=16384)
    port = free_port()
    server = Server(["--model", f"tiny={long_context}", "--http", f"127.0.0.1:{port}"],
                    config_file)
    base = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready()
        results: list[list[Any]] = [[] for _ in range(8)]
        # Four short streams finish within the drain; four long ones cannot.
        threads = [threading.Thread(target=_stream, args=(base, 20 if i < 4 else 100_000 // 25,
                                                          results[i]))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        _wait_until(lambda: all(len(r) >= 1 for r in results[4:]))
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
        for i, events in enumerate(results):
            last = events[-1] if events[-1] != "[DONE]" else events[-2]
            if i < 4:
                assert last["choices"][0]["finish_reason"] == "length", events[-3:]
            else:
                error = last.get("error") or {}
                assert error.get("code") == "ServerError", events[-3:]
                assert error.get("retryable") is True
                assert "shutting down" in error["message"]
    finally:
        server.stop()


def test_a_port_in_use_exits_non_zero_with_one_clear_line(model_path: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"])
        try:
            assert server.process.wait(timeout=60) != 0
            _wait_until(lambda: bool(server.said("corral:")))
            [line] = server.said("corral:")
            assert "Address already in use" in line and str(port) in line
            assert not server.said("loading"), "the port is checked before any model loads"
        finally:
            server.stop()


def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("json_rpc:\n  retry:\n    jitter: 2\n")
    result = subprocess.run([sys.executable, "-m", "corral.cli", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "corral: bad config: json_rpc.retry.jitter: expected <= 1"


def test_jsonrpc_on_stdio_then_shutdown_exits_0(model_path: str) -> None:
    server = Server(["--model", f"tiny={model_path}", "--http", "", "--jsonrpc", "stdio"])
    try:
        server.wait_ready()
        assert server.process.stdin is not None and server.process.stdout is not None
        lines = iter(server.process.stdout)

        def call(id_: int, method: str, params: Any = None) -> dict[str, Any]:
            request = {"jsonrpc": "2.0", "id": id_, "method": method}
            if params is not None:
                request["params"] = params
            server.process.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
            server.process.stdin.flush()  # type: ignore[union-attr]
            while True:
                message = json.loads(next(lines))
                if message.get("id") == id_:
                    return message

        assert call(1, "list_models")["result"][0]["alias"] == "tiny"
        done = call(2, "complete", {"model": "tiny", "prompt": "Hi", "max_tokens": 3})
        assert done["result"]["usage"]["completion_tokens"] == 3
        bad = call(3, "no/such/method")
        assert bad["error"]["code"] == -32601
        assert call(4, "shutdown")["result"] == {"shutdown": True}
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()


def _wait_until(condition: Any, timeout: float = 60.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        done.wait(0.05)
    raise AssertionError("condition not met in time")



def test_jsonrpc_stdio_answers_what_it_read_before_eof_and_listens_nowhere_else(
        model_path: str) -> None:
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "list_models"},
        {"jsonrpc": "2.0", "id": 2, "method": "complete",
         "params": {"model": "tiny", "prompt": "Hi", "max_tokens": 3}},
        {"jsonrpc": "2.0", "id": 3, "method": "generate",
         "params": {"model": "tiny", "prompt": "Hi", "max_tokens": 3}},
        {"jsonrpc": "2.0", "id": 4, "method": "no/such/method"},
    ]
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "serve", "--model", f"tiny={model_path}",
         "--jsonrpc", "stdio"],
        input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    answered = {m["id"]: m for m in messages if "id" in m}
    assert set(answered) == {1, 2, 3, 4}
    assert answered[2]["result"]["usage"]["completion_tokens"] == 3
    assert answered[4]["error"]["code"] == -32601
    [end] = [m for m in messages if m.get("method") == "stream.end"]
    assert end["params"]["stream_id"] == answered[3]["result"]["stream_id"]
    [banner] = [line for line in result.stderr.splitlines() if line.startswith("corral serving")]
    assert banner == "corral serving stdio (models: tiny)"  # no HTTP listener beside it


def test_the_default_model_says_what_it_is_and_host_port_log_level_work(
        tmp_path: Path) -> None:
    port = free_port()
    # A cache without SmolLM2: the tiny model is the default.
    server = Server(["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                    env={"CORRAL_CACHE_DIR": str(tmp_path)})
    try:
        server.wait_ready()
        assert server.said("loading tiny")
        assert server.said("corral serving")[0].startswith(f"corral serving http://127.0.0.1:{port}")
        # The note follows the banner: the reader thread may not have it yet.
        _wait_until(lambda: server.said("corral: 'tiny' is the built-in test model"))
        [note] = server.said("corral: 'tiny' is the built-in test model")
        assert "random weights" in note and "Serve your own model" in note
        assert "corral fetch-default-model" in note
        # At warning level, no actor internals on the way up.
        assert not [line for line in server.lines if "actor.started" in line]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_version_prints_the_package_version() -> None:
    result = subprocess.run([sys.executable, "-m", "corral.cli", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip().startswith("corral 0.")


def test_with_smollm2_in_the_cache_the_default_answers_a_real_question(
        smollm2_gguf: Path, smollm2_cache: Path) -> None:
    # The cache `corral fetch-default-model` (and `make serve`) fills: the GGUF and its
    # conversion.
    (smollm2_cache / "smollm2").mkdir(exist_ok=True)
    linked = smollm2_cache / "smollm2" / smollm2_gguf.name
    if not linked.exists():
        linked.symlink_to(smollm2_gguf)
    port = free_port()
    server = Server(["--http", f"127.0.0.1:{port}"], env={"CORRAL_CACHE_DIR": str(smollm2_cache)})
    try:
        server.wait_ready()
        assert server.said("corral: no model given: serving smollm2")
        assert "smollm2" in server.said("corral serving")[0]
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0) as client:
            reply = client.chat.completions.create(
                model="smollm2", max_tokens=24, temperature=0,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
        # mlx_lm.generate on the same converted model answers the same.
        assert reply.choices[0].message.content == "The capital of France is Paris."
    finally:
        server.stop()
