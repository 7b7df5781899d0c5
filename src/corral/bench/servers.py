"""The servers a serving benchmark starts: corral (by isolation and config) and
mlx_lm.server, each a subprocess on a free port, waited for until ready and stopped.

Nothing here generates load or measures; it only starts and stops servers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from corral.bench.loadgen import Target

__all__ = ["BASELINE", "ServerProcess", "corral_config", "corral_server", "free_port",
           "mlx_lm_server"]

BASELINE = "mlx_lm.server"
"""The name the mlx_lm.server target goes by in results and tables."""
_ALIAS = "tiny"
_READY_S = 120.0
_STOP_S = 20.0
# The engine settings every target shares: mlx_lm.server's defaults (decode and prompt
# concurrency, prefill step), which are also corral's.
COMPLETION_BATCH = 32
PREFILL_BATCH = 8
PREFILL_STEP = 2048


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """An OpenAI-compatible server as a subprocess on 127.0.0.1, for one benchmark.

    Its output goes to a log file: a pipe nobody reads would stall it once full.
    `running()` starts it and always stops and reaps it on the way out.
    """

    def __init__(self, name: str, command: list[str], port: int, model: str | None,
                 log_path: Path) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.log_path = log_path
        self.target = Target(name, f"http://127.0.0.1:{port}", model)
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @contextlib.contextmanager
    def running(self) -> Iterator[ServerProcess]:
        env = {k: v for k, v in os.environ.items() if k != "CORRAL_ENV"}
        env["HF_HUB_OFFLINE"] = "1"  # a local model path; never the network
        env.setdefault("RAY_ADDRESS", "local")  # `--ray`: a Ray of its own, not a stray one
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield self
        finally:
            self.stop()

    def wait_ready(self, timeout_s: float = _READY_S) -> None:
        """Poll GET /v1/models until it answers 200.

        Raises:
            RuntimeError: the server exited, or did not answer within `timeout_s`.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.target.base_url}/v1/models", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:g} s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `_STOP_S`; the process is reaped either way."""
        process = self.process
        if process is None or self.returncode is not None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_S)
            except subprocess.TimeoutExpired:
                process.kill()
        self.returncode = process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def corral_server(name: str, model_path: str, directory: Path, config: str,
                  options: Sequence[str] = ()) -> ServerProcess:
    """`corral serve [options]` of the tiny model under `config` (YAML text) on a free
    port."""
    port = free_port()
    config_path = directory / f"{name}.yaml"
    config_path.write_text(config)
    command = [sys.executable, "-m", "corral.cli", "serve", *options, "--model",
               f"{_ALIAS}={model_path}", "--http", f"127.0.0.1:{port}",
               "--config", str(config_path)]
    return ServerProcess(name, command, port, _ALIAS, directory / f"{name}.log")


def corral_config(isolation: str, generation: str = "") -> str:
    return (f"generation:\n  isolation: {isolation}\n{generation}"
            f"  completion_batch_size: {COMPLETION_BATCH}\n"
            f"  prefill_batch_size: {PREFILL_BATCH}\n"
            f"  prefill_step_size: {PREFILL_STEP}\n"
            # As many streams at once as mlx_lm.server decodes; the rest queue.
            f"stream_registry:\n  max_active_streams: {COMPLETION_BATCH}\n"
            "  max_queued: 4096\n"
            "server:\n  drain_timeout_ms: 2000\n"
            "logging:\n  format: json\n  level: warning\n")


def mlx_lm_server(model_path: str, directory: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "mlx_lm.server", "--model", model_path,
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING",
               "--decode-concurrency", str(COMPLETION_BATCH),
               "--prompt-concurrency", str(PREFILL_BATCH),
               "--prefill-step-size", str(PREFILL_STEP)]
    return ServerProcess(BASELINE, command, port, None, directory / "mlx_lm.server.log")
