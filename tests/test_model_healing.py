"""A model that cannot load is an answer, and a model that failed for good heals itself
(issue 12, items 6, 13 and 14).

- A path that is neither a model directory nor a model in the local Hugging Face cache
  is refused before any actor starts, without the network; a cached one loads.
- A load that fails in the engine answers ModelLoadError without restarting anything.
- A model whose subtree gave up is reloaded after delays that double up to a maximum,
  each through one trial load, while Retry-After tells the time until the next one.

The reload delays are counted on trio's MockClock (the reloads that fail there fail
before any MLX work); everything that runs MLX runs in real time, bounded by fail_after.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import CircuitBreakerOpenError, Code, CorralError, EngineClientError
from corral.runtime import ModelDescription, Runtime, open_runtime
from corral.server.jsonrpc import JsonRpcListener

PROMPT = "The quick brown fox"
RELOAD_DELAY_MAX_S = 300.0  # the documented longest wait between two reloads
LIFECYCLE_OF_A_CRASH = ("exited", "restarting", "restarted", "intensity_exceeded")

pytestmark = pytest.mark.slow


def _config(isolation: str = "thread", max_restarts: int = 3, recovery_ms: int = 10000,
            ) -> RuntimeConfig:
    return config_from_mapping({
        "generation": {"isolation": isolation},
        "json_rpc": {"circuit_breaker": {"recovery_timeout_ms": recovery_ms}},
        "python_runtime": {"max_restarts": max_restarts, "restart_period_ms": 60000,
                           "restart_delay_base_ms": 10, "restart_delay_max_ms": 100,
                           "heartbeat_interval_ms": 200},
        "supervision": {"backoff": {"min_ms": 1, "max_ms": 10, "random_factor": 0.0}},
    })


def _model(rt: Runtime, alias: str = "tiny") -> ModelDescription:
    return {m.alias: m for m in rt.list_models()}[alias]


async def _served(rt: Runtime, alias: str = "tiny") -> None:
    with trio.fail_after(60):
        completion = await rt.complete(alias, PROMPT, max_tokens=4)
    assert completion.finish_reason in ("length", "stop")


def _crashes(events: Any, alias: str) -> list[Any]:
    """Every lifecycle event that says something under model:<alias> crashed."""
    prefix = f"root/generation/model:{alias}"
    return [e for e in events.events
            if e.kind in LIFECYCLE_OF_A_CRASH and e.path.startswith(prefix)]


def _without_weights(model_path: str, directory: Path) -> str:
    """A directory with the tiny model's config and tokenizer but no weights."""
    shutil.copytree(model_path, directory)
    for weights in directory.glob("*.safetensors"):
        weights.unlink()
    return str(directory)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve a host name or connect a socket fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the network was used: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache of this test's own."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# -- item 6: a path that leads to no model ----------------------------------------------


@pytest.mark.usefixtures("no_network")
async def test_a_missing_directory_is_refused_before_any_actor_starts(
        model_path: str, hf_cache: Path, tmp_path: Path, record_events: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    refusals = {
        "./no-such-model": "no such directory ./no-such-model, and './no-such-model' is "
                           "not a Hugging Face model id (org/name) either",
        "x/y": f"no such directory x/y, and no model 'x/y' in the Hugging Face cache at "
               f"{hf_cache} (corral does not download models: `hf download x/y` does)",
        "weights.bin": "weights.bin is a file, not a model directory",
        "empty": "empty has no config.json: it is not a model directory",
    }
    async with open_runtime(_config(), models={"tiny": model_path}) as rt:
        events = record_events(rt)
        for path, message in refusals.items():
            with pytest.raises(EngineClientError) as caught:
                await rt.load_model(path, alias="other")
            assert caught.value.code is Code.MODEL_LOAD_ERROR
            assert caught.value.message == message
            assert not caught.value.retryable
        assert [e for e in events.events if "model:other" in e.path] == []
        assert [m.alias for m in rt.list_models()] == ["tiny"]
        await _served(rt)


@pytest.mark.usefixtures("no_network")
async def test_a_model_in_the_hugging_face_cache_loads_by_its_id(
        model_path: str, hf_cache: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--corral-test--tiny"
    shutil.copytree(model_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    async with open_runtime(_config()) as rt:
        with trio.fail_after(60):
            loaded = await rt.load_model("corral-test/tiny")
        assert (loaded.alias, loaded.path, loaded.state) == ("tiny", "corral-test/tiny", "ready")
        assert loaded.info is not None
        assert loaded.info.path == str(repo / "snapshots" / commit)
        await _served(rt)


# -- item 14: a load that fails is an answer, not a crash --------------------------------


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_model_that_cannot_load_answers_without_a_restart(
        model_path: str, tmp_path: Path, record_events: Any, isolation: str) -> None:
    broken = _without_weights(model_path, tmp_path / "broken")
    async with open_runtime(_config(isolation), models={"tiny": model_path}) as rt:
        events = record_events(rt)
        with trio.fail_after(60), pytest.raises(EngineClientError) as caught:
            await rt.load_model(broken, alias="broken")
        assert caught.value.code is Code.MODEL_LOAD_ERROR
        assert caught.value.message.startswith(f"model broken: load failed: cannot load {broken}")
        assert "No safetensors found" in caught.value.message
        assert events.of("started", "root/generation/model:broken/model")  # it did try
        assert _crashes(events, "broken") == []
        assert [m.alias for m in rt.list_models()] == ["tiny"]
        await _served(rt)
        with trio.fail_after(60):  # the alias is free again
            assert (await rt.load_model(model_path, alias="broken")).state == "ready"
        await _served(rt, "broken")


async def test_json_rpc_load_model_with_a_bad_path_answers_model_load_error(
        model_path: str, tmp_path: Path, record_events: Any) -> None:
    broken = _without_weights(model_path, tmp_path / "broken")
    async with open_runtime(_config(), models={"tiny": model_path}) as rt:
        events = record_events(rt)
        listener = JsonRpcListener(rt, "tcp://127.0.0.1:0")
        await rt.start_transport(listener.spec("jsonrpc"))
        assert listener.port is not None
        with trio.fail_after(60):
            stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
            async with stream:
                replies = _Lines(stream)
                await replies.send({"jsonrpc": "2.0", "id": 1, "method": "load_model",
                                    "params": {"path": broken, "alias": "broken"}})
                error = (await replies.next())["error"]
                assert error["code"] == -32001
                assert error["message"].startswith("model broken: load failed: cannot load")
                await replies.send({"jsonrpc": "2.0", "id": 2, "method": "load_model",
                                    "params": {"path": str(tmp_path / "nowhere")}})
                error = (await replies.next())["error"]
                assert error["code"] == -32001
                assert error["message"].startswith(f"no such directory {tmp_path}/nowhere")
                # The same connection goes on serving.
                await replies.send({"jsonrpc": "2.0", "id": 3, "method": "complete",
                                    "params": {"model": "tiny", "prompt": PROMPT,
                                               "max_tokens": 4}})
                assert (await replies.next())["result"]["finish_reason"] in ("length", "stop")
        assert _crashes(events, "broken") == []
        assert [e for e in events.events if "model:nowhere" in e.path] == []


class _Lines:
    """Newline-delimited JSON over one trio stream (replies only; no notifications)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def send(self, message: dict[str, Any]) -> None:
        await self._stream.send_all(json.dumps(message).encode() + b"\n")

    async def next(self) -> Any:
        while (end := self._buffer.find(b"\n")) < 0:
            data = await self._stream.receive_some(65536)
            assert data, "the server closed the connection"
            self._buffer += data
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        return json.loads(line)


# -- item 13: a model that failed for good heals itself ------------------------------------


async def _fail_for_good(rt: Runtime) -> None:
    """Crash the engine once under max_restarts=0: the subtree gives up at once."""
    await rt.inject_fault("tiny", "raise")
    with trio.fail_after(60):
        with pytest.raises(CorralError) as caught:
            await rt.complete("tiny", PROMPT, max_tokens=4)
        assert caught.value.code is Code.GENERATION_ERROR
        assert "injected engine fault" in caught.value.message
        while _model(rt).state != "failed":
            await trio.sleep(0.01)


async def _retry_after(rt: Runtime) -> CircuitBreakerOpenError:
    with pytest.raises(CircuitBreakerOpenError) as caught:
        await rt.complete("tiny", PROMPT, max_tokens=4)
    return caught.value


async def test_reloads_come_after_doubling_delays_up_to_the_maximum_and_retry_after_is_true(
        mock_clock: trio.testing.MockClock, model_path: str, tmp_path: Path,
        record_events: Any) -> None:
    recovery_s = 60.0  # json_rpc.circuit_breaker.recovery_timeout_ms: the first delay
    cap = RELOAD_DELAY_MAX_S
    delays = [min(cap, recovery_s * 2**n) for n in range(8)]
    assert delays[-2:] == [cap, cap]
    source = tmp_path / "tiny"
    shutil.copytree(model_path, source)
    mock_clock.rate = 1.0  # MLX loads and steps in real time
    async with open_runtime(_config(max_restarts=0, recovery_ms=int(recovery_s * 1000)),
                            models={"tiny": str(source)}) as rt:
        events = record_events(rt)
        source.rename(tmp_path / "moved")  # from now on every reload fails at once
        await _fail_for_good(rt)
        failed = _model(rt)
        assert (failed.breaker, failed.reloads) == ("forced_open", 0)
        assert failed.reload_in_s is not None and 0 < failed.reload_in_s <= recovery_s
        assert "model tiny failed" in rt.health().reasons
        started = len(events.of("started"))

        mock_clock.rate = 0.0  # mock time only, from here to the first trial that loads
        mock_clock.autojump_threshold = 0
        attempts = []
        with trio.fail_after(sum(delays) + 60):
            for attempt, delay in enumerate(delays, 1):
                waiting = _model(rt)
                assert (waiting.state, waiting.breaker, waiting.reloads) == (
                    "failed", "forced_open", attempt - 1)
                assert waiting.reload_in_s is not None
                if attempt > 1:
                    assert waiting.reload_in_s == pytest.approx(delay, abs=0.01)
                refused = await _retry_after(rt)
                assert refused.state == "forced_open"
                assert refused.retry_after_ms == math.ceil(waiting.reload_in_s * 1000)
                await trio.sleep(waiting.reload_in_s / 2)
                assert (await _retry_after(rt)).retry_after_ms == pytest.approx(
                    waiting.reload_in_s * 500, abs=1)
                await trio.sleep(waiting.reload_in_s / 2)
                while _model(rt).reloads < attempt:
                    await trio.sleep(0.001)
                attempts.append(trio.current_time())
        gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
        assert gaps == pytest.approx(delays[1:], abs=0.01)
        assert len(events.of("started")) == started  # a reload that cannot load starts nothing
        assert rt.health().reasons == ["model tiny failed",
                                       f"model tiny reloads in {cap:.1f}s"]

        (tmp_path / "moved").rename(source)  # the next reload finds the model again
        mock_clock.autojump_threshold = math.inf
        reload_in = _model(rt).reload_in_s
        assert reload_in is not None
        mock_clock.jump(reload_in)
        mock_clock.rate = 1.0
        await trio.testing.wait_all_tasks_blocked()
        trial = _model(rt)
        if trial.state == "failed":  # the trial load is still running (it usually is)
            assert (trial.breaker, trial.reload_in_s) == ("half_open", None)
            assert (await _retry_after(rt)).state == "half_open"
            assert "model tiny is reloading" in rt.health().reasons
        with trio.fail_after(60):
            while _model(rt).state != "ready":
                await trio.sleep(0.01)
        healed = _model(rt)
        assert (healed.breaker, healed.reloads, healed.reload_in_s) == (
            "closed", len(delays) + 1, None)
        assert rt.health().ok
        await _served(rt)
        assert _model(rt).breaker == "closed"


async def test_closing_the_runtime_during_a_reload_stops_everything(
        mock_clock: trio.testing.MockClock, model_path: str, record_events: Any) -> None:
    mock_clock.rate = 1.0
    with trio.fail_after(120):  # the jump below counts for 60 s of it
        async with open_runtime(_config(max_restarts=0, recovery_ms=60000),
                                models={"tiny": model_path}) as rt:
            events = record_events(rt)
            await _fail_for_good(rt)
            started = len(events.of("started", "root/generation/model:tiny/model"))
            reload_in = _model(rt).reload_in_s
            assert reload_in is not None
            mock_clock.jump(reload_in)
            await trio.testing.wait_all_tasks_blocked()
            assert len(events.of("started", "root/generation/model:tiny/model")) == started + 1
    assert events.of("stopped", "root/generation/model:tiny/model")[-1].time >= (
        events.of("started", "root/generation/model:tiny/model")[-1].time)


async def test_a_model_failed_by_worker_kills_reloads_and_serves_again(
        model_path: str, record_events: Any) -> None:
    config = _config("process", max_restarts=1, recovery_ms=2000)
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        events = record_events(rt)
        first_pid = None
        for _ in range(2):  # the first kill restarts; the second exceeds max_restarts=1
            stats = rt.engine_statistics("tiny")
            pid = getattr(stats, "pid", None)
            assert pid is not None
            first_pid = first_pid or pid
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(60):
                while getattr(rt.engine_statistics("tiny"), "pid", None) == pid:
                    await trio.sleep(0.02)
                while _model(rt).state not in ("ready", "failed"):
                    await trio.sleep(0.02)
        await events.wait("intensity_exceeded", "root/generation/model:tiny")
        # The client is told to come back, and when: the reload is due within 2 s, or
        # running now.
        refused = await _retry_after(rt)
        assert refused.state in ("forced_open", "half_open")
        assert 0 < refused.retry_after_ms
        with trio.fail_after(60):
            while _model(rt).state != "ready":
                await trio.sleep(0.02)
        healed = _model(rt)
        assert (healed.breaker, healed.reloads) == ("closed", 1)
        assert getattr(rt.engine_statistics("tiny"), "pid", None) not in (None, first_pid)
        assert rt.health().ok
        await _served(rt)


async def test_retry_after_during_a_reload_is_the_time_the_last_trial_took(
        mock_clock: trio.testing.MockClock) -> None:
    """Issue 21 item 9: a reload that took 10 s (a load that ran into its startup
    timeout) is followed by one that is told to wait 10 s, less what it has run, not 1 s."""
    from corral.config import ModelConfig
    from corral.runtime.model_record import ModelRecord, held_open

    mock_clock.autojump_threshold = 0
    model = ModelRecord(ModelConfig(alias="tiny", path="/models/tiny"), "/models/tiny")
    model.state = "failed"
    assert held_open(model).retry_after_ms == 1000  # nothing known yet: the floor

    model.trial_since = trio.current_time()
    await trio.sleep(10.0)  # the first trial runs into a 10 s startup timeout
    model.trial_seconds, model.trial_since = trio.current_time() - model.trial_since, None
    model.trial_since = trio.current_time()  # the next trial begins
    refused = held_open(model)
    assert (refused.state, refused.retry_after_ms) == ("half_open", 10000)
    await trio.sleep(4.0)
    assert held_open(model).retry_after_ms == 6000
    await trio.sleep(10.0)  # it overran the last one: no estimate is left but the floor
    assert held_open(model).retry_after_ms == 1000

    model.trial_since, model.reload_at = None, trio.current_time() + 30.0  # it failed
    assert (held_open(model).state, held_open(model).retry_after_ms) == ("forced_open", 30000)
