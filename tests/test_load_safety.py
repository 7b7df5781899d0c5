"""Loads that cannot hurt the server (issue 21, items 3 and 5): a model directory with
a FIFO, a device, an oversized text file or an absurd config is refused with a
ModelLoadError naming the file before anything opens it, so the event loop never blocks
and memory never grows; the models already loaded keep serving."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from corral.config import config_from_mapping
from corral.engine.model_files import check_model_files
from corral.protocol.errors import Code, EngineClientError
from corral.runtime import open_runtime
from test_http import Served, serve_http

KEY = "s3cret-admin-key-0123"


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _to_fifo(path: Path) -> None:
    elsewhere = path.parent.parent / f"{path.parent.name}.fifo"  # outside the model
    os.mkfifo(elsewhere)
    path.unlink()
    path.symlink_to(elsewhere)


def _to_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _sparse(size: int) -> Callable[[Path], None]:
    def grow(path: Path) -> None:
        with open(path, "r+b") as file:
            file.truncate(size)
    return grow


def _config(**values: Any) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, **values}))
    return edit


BREAKAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "fifo-weights": ("model.safetensors", _fifo, "is a FIFO"),
    "symlink-to-fifo-tokenizer": ("tokenizer.json", _to_fifo, "is a FIFO"),
    "dev-zero-tokenizer": ("tokenizer.json", _to_dev_zero, "is a device"),
    "1-GiB-config": ("config.json", _sparse(1 << 30), "more than the 1048576"),
    "65-MiB-tokenizer": ("tokenizer.json", _sparse(65 << 20), "more than the 67108864"),
    "100000-layers": ("config.json", _config(num_hidden_layers=100000),
                      "num_hidden_layers: 100000"),
    "layers-beyond-the-weights": ("config.json", _config(num_hidden_layers=4000),
                                  "more than the"),
    "hidden-size-a-string": ("config.json", _config(hidden_size="64"), "hidden_size"),
}


def _broken(model_path: str, root: Path, name: str) -> tuple[Path, str]:
    file, breaks, message = BREAKAGES[name]
    target = root / name
    shutil.copytree(model_path, target)
    breaks(target / file)
    return target, message


@pytest.mark.parametrize("name", list(BREAKAGES))
async def test_a_bad_model_directory_is_refused_before_any_file_is_opened(
        model_path: str, tmp_path: Path, name: str) -> None:
    directory, message = _broken(model_path, tmp_path, name)
    with trio.fail_after(60):  # a check that opened the FIFO would hang here
        with pytest.raises(EngineClientError) as raised:
            await trio.to_thread.run_sync(check_model_files, str(directory),
                                          abandon_on_cancel=True)
    assert raised.value.code is Code.MODEL_LOAD_ERROR and not raised.value.retryable
    assert message in raised.value.message
    assert BREAKAGES[name][0] in raised.value.message  # it names the file


@pytest.fixture
async def admin(model_path: str) -> AsyncIterator[Served]:
    config = config_from_mapping({"server": {"admin_api_key": KEY},
                                  "generation": {"isolation": "thread"}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        yield served
        served.metrics.close()


@pytest.mark.slow
async def test_bad_admin_loads_are_400s_and_the_thread_isolated_server_keeps_serving(
        admin: Served, model_path: str, tmp_path: Path) -> None:
    for name in ("fifo-weights", "dev-zero-tokenizer", "1-GiB-config", "100000-layers"):
        directory, message = _broken(model_path, tmp_path, name)
        with trio.fail_after(120):  # before the fix: the event loop froze for good
            loaded = await admin.post("/v1/models/load",
                                      headers={"authorization": f"Bearer {KEY}"},
                                      json={"path": str(directory), "alias": name})
        assert loaded.status_code == 400, loaded.text
        assert message in loaded.text and BREAKAGES[name][0] in loaded.text
        assert (await admin.get("/health")).status_code == 200
        chat = await admin.sync(lambda client: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4))
        assert chat.choices[0].finish_reason in ("length", "stop")
    cards = (await admin.get("/v1/models")).json()["data"]
    assert [card["id"] for card in cards] == ["tiny"]


def _bloated(model_path: str, target: Path, vocab_size: int) -> Path:
    """The tiny model with an embedding and an output layer of `vocab_size` rows: valid
    safetensors whose large tensors are a hole in a sparse file (cheap to write, as
    large as their shape once loaded)."""
    shutil.copytree(model_path, target)
    weights = target / "model.safetensors"
    raw = weights.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_size])
    header.pop("__metadata__", None)
    data = raw[8 + header_size:]
    small = {name: t for name, t in header.items() if t["shape"][0] != 594}
    large = {name: t for name, t in header.items() if t["shape"][0] == 594}
    layout: dict[str, Any] = {}
    body = bytearray()
    for name, tensor in small.items():
        begin, end = tensor["data_offsets"]
        layout[name] = {**tensor, "data_offsets": [len(body), len(body) + end - begin]}
        body += data[begin:end]
    offset = len(body)
    for name, tensor in large.items():
        size = vocab_size * tensor["shape"][1] * 4  # float32
        layout[name] = {**tensor, "shape": [vocab_size, tensor["shape"][1]],
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(layout).encode()
    with open(weights, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded + body)
        file.truncate(8 + len(encoded) + offset)
    _config(vocab_size=vocab_size)(target / "config.json")
    return target


@pytest.mark.slow
async def test_a_load_past_the_worker_memory_limit_fails_alone_with_a_model_load_error(
        model_path: str, tmp_path: Path) -> None:
    bloated = _bloated(model_path, tmp_path / "bloated", 1 << 22)  # 2 GiB of float32
    config = config_from_mapping({
        "generation": {"isolation": "process"},
        "python_runtime": {"worker_memory_limit_mb": 1536, "standby_worker": False}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        with pytest.raises(EngineClientError) as raised:
            await rt.load_model(str(bloated), alias="bloated")
        assert raised.value.code is Code.MODEL_LOAD_ERROR
        assert "bloated" in raised.value.message
        if sys.platform == "linux":  # the only platform that enforces the limit
            assert ("may map at most 1536 MiB: python_runtime.worker_memory_limit_mb"
                    in raised.value.message), raised.value.message
        assert [m.alias for m in rt.list_models()] == ["tiny"]
        completion = await rt.complete("tiny", "Hi", max_tokens=4)
        assert completion.choices[0].finish_reason in ("length", "stop")


@pytest.mark.slow
async def test_a_load_stuck_in_the_engine_thread_times_out_and_the_loop_keeps_serving(
        model_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load that never ends (a disk that stops answering; here a load that waits on
    an event) fails at `startup_timeout_ms` with a typed ModelLoadError; the trio side
    never waits on the engine thread, which is left to finish and then exits."""
    import threading

    import corral.engine.core as core

    release = threading.Event()
    stuck_path = str(shutil.copytree(model_path, tmp_path / "stuck"))
    real_load = core.load_weights

    def load(settings: Any) -> Any:
        if settings.path == stuck_path:
            release.wait(300)
        return real_load(settings)

    monkeypatch.setattr(core, "load_weights", load)
    config = config_from_mapping({"generation": {"isolation": "thread"},
                                  "python_runtime": {"startup_timeout_ms": 3000}})
    try:
        async with open_runtime(config, models={"tiny": model_path}) as rt:
            with trio.fail_after(120), pytest.raises(EngineClientError) as raised:
                await rt.load_model(stuck_path, alias="stuck")
            assert raised.value.code is Code.MODEL_LOAD_ERROR
            assert "stuck" in raised.value.message
            assert [m.alias for m in rt.list_models()] == ["tiny"]
            completion = await rt.complete("tiny", "Hi", max_tokens=4)
            assert completion.choices[0].finish_reason in ("length", "stop")
    finally:
        release.set()
