"""GGUF files loaded through the runtime's front doors: `POST /v1/models/load` converts a
file in a worker thread and serves it; a file corral cannot serve is a 400 ModelLoadError
naming why, never a 500. Tiny synthetic files, so the model's answers are gibberish."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.config import config_from_mapping
from corral.runtime import open_runtime
from synthetic_gguf import write_model
from test_http import Served, serve_http

pytestmark = pytest.mark.slow

KEY = "s3cret-admin-key-0123"
HEADERS = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
async def admin(model_path: str, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    config = config_from_mapping({"server": {"admin_api_key": KEY}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        yield served
        served.metrics.close()


async def test_a_gguf_file_loads_over_http_and_serves(admin: Served, tmp_path: Path) -> None:
    path = tmp_path / "qwen3.gguf"
    write_model(path, "qwen3")
    loaded = await admin.post("/v1/models/load", headers=HEADERS,
                              json={"path": str(path), "alias": "q"})
    assert loaded.status_code == 200, loaded.text
    assert (loaded.json()["id"], loaded.json()["state"]) == ("q", "ready")
    reply = await admin.sync(lambda client: client.chat.completions.create(
        model="q", messages=[{"role": "user", "content": "hello"}], max_tokens=3))
    assert reply.usage.completion_tokens == 3
    assert [p.parent.name for p in (tmp_path / "cache" / "gguf").glob("*/config.json")] != []


async def test_a_model_corral_cannot_serve_is_a_400(admin: Served, tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_model(path, "llama", architecture="mamba")
    refused = await admin.post("/v1/models/load", headers=HEADERS,
                               json={"path": str(path), "alias": "other"})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "ModelLoadError"
    assert "GGUF architecture 'mamba' is not supported" in error["message"]
    missing = await admin.post("/v1/models/load", headers=HEADERS,
                               json={"path": "ollama:not-pulled", "alias": "other"})
    assert missing.status_code == 400 and "no Ollama model" in missing.json()["error"]["message"]
    aliases = [card["id"] for card in (await admin.get("/v1/models")).json()["data"]]
    assert aliases == ["tiny"]
