"""`corral serve`'s first-run frictions (issue 23): the options that override the config,
CORRAL_ENV and CORRAL_<SECTION>__<KEY> without a file, Ray-only options refused without
--ray, and the built-in model names `tiny` and `smollm2`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.engine.loaders import resolve_model
from corral.protocol.errors import EngineClientError
from corral.tiny import default_model_path
from test_serve import Server, free_port

pytestmark = pytest.mark.slow


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


@pytest.mark.parametrize("option", [["--replicas", "2"], ["--autoscale", "1:4"]])
def test_ray_options_without_ray_exit_2(option: list[str]) -> None:
    done = _run("serve", *option, "--http", "127.0.0.1:1")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"corral: {option[0]} needs --ray: without it corral "
                                   f"serves one process")


def test_a_bad_admin_key_option_is_a_config_error() -> None:
    done = _run("serve", "--admin-key", "short")
    assert done.returncode == 2
    assert "server.admin_api_key" in done.stderr


def _runtime_info(port: int) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "runtime/info"}\n')
        data = b""
        while not data.endswith(b"\n"):
            data += sock.recv(65536)
    result: dict[str, Any] = json.loads(data)["result"]
    return result


def test_options_override_the_file_the_overlay_and_the_variables(tmp_path: Path) -> None:
    config = tmp_path / "runtime.yaml"
    config.write_text("generation:\n  isolation: process\n"
                      "stream_registry:\n  max_active_streams: 8\n  max_queued: 9\n")
    http, rpc = free_port(), free_port()
    key = "a-key-of-twenty-chars"
    prefix_dir = tmp_path / "kv"
    server = Server(["--model", "tiny", "--http", f"127.0.0.1:{http}",
                     "--jsonrpc", f"tcp://127.0.0.1:{rpc}", "--isolation", "thread",
                     "--max-active-streams", "3", "--max-queued", "5",
                     "--prefix-cache-dir", str(prefix_dir)], config,
                    env={"CORRAL_ENV": "production",  # process isolation, JSON logs
                         "CORRAL_STREAM_REGISTRY__MAX_QUEUED": "7",
                         "CORRAL_ADMIN_KEY": key})
    try:
        server.wait_ready()
        info = _runtime_info(rpc)
        assert info["models"] == ["tiny"]
        assert info["generation"]["isolation"] == "thread"
        assert (info["limits"]["max_active_streams"], info["limits"]["max_queued_streams"]) \
            == (3, 5)
        assert [p.is_dir() for p in prefix_dir.iterdir()] == [True]  # the model's tier
        base = f"http://127.0.0.1:{http}"
        # The admin routes are on (without a key they answer 404): the wrong key is a 401.
        wrong = httpx.post(f"{base}/v1/models/unload", json={"alias": "nope"}, timeout=10,
                           headers={"Authorization": "Bearer not-the-right-key-at-all"})
        assert wrong.status_code == 401
        right = httpx.post(f"{base}/v1/models/unload", json={"alias": "nope"}, timeout=10,
                           headers={"Authorization": f"Bearer {key}"})
        assert right.status_code == 404 and "nope" in right.text
        reply = httpx.post(f"{base}/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 3}).json()
        assert reply["usage"]["completion_tokens"] == 3
    finally:
        server.stop()


def test_variables_alone_configure_serve() -> None:
    http = free_port()
    server = Server(["--model", "tiny"], env={"CORRAL_SERVER__HTTP_PORT": str(http),
                                              "CORRAL_SERVER__HTTP_HOST": "127.0.0.1"})
    try:
        server.wait_ready()
        assert f"http://127.0.0.1:{http}" in server.said("corral serving")[0]
    finally:
        server.stop()
    done = _run("serve", CORRAL_SERVER__PORT="9000")
    assert done.returncode == 2
    assert done.stderr.strip() == ("corral: bad config: server.port: unknown field "
                                   "(set by CORRAL_SERVER__PORT)")


def test_tiny_and_smollm2_are_model_names(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model("tiny") == str(default_model_path())
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(EngineClientError) as info:
        resolve_model("smollm2")
    assert info.value.message == ("smollm2 (SmolLM2-135M-Instruct, the default model) is "
                                  "not in corral's cache: run `corral fetch-default-model` "
                                  "first")
    # A directory of that name wins over the built-in name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    with pytest.raises(EngineClientError, match=r"tiny has no config\.json"):
        resolve_model("tiny")


def test_serve_model_smollm2_without_the_cache_says_how_to_fetch_it(tmp_path: Path) -> None:
    done = _run("serve", "--model", "smollm2", "--http", f"127.0.0.1:{free_port()}",
                CORRAL_CACHE_DIR=str(tmp_path))
    assert done.returncode == 1
    assert "run `corral fetch-default-model` first" in done.stderr
    assert "hf download" not in done.stderr
