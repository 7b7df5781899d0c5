"""Models over HTTP (issue 14, item 5): POST /v1/models/load and /v1/models/unload,
off unless `server.admin_api_key` is set; a bad key is a 401 that changes nothing.

A real HTTP server on 127.0.0.1, httpx for the admin calls and the official `openai`
client for the generation that follows.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from corral.config import config_from_mapping
from corral.runtime import open_runtime
from test_http import Served, serve_http

pytestmark = pytest.mark.slow

KEY = "s3cret-admin-key-0123"


def _headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def admin(model_path: str) -> AsyncIterator[Served]:
    config = config_from_mapping({"server": {"admin_api_key": KEY}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        yield served
        served.metrics.close()


async def _aliases(served: Served) -> list[str]:
    return [card["id"] for card in (await served.get("/v1/models")).json()["data"]]


async def _chat(served: Served, model: str) -> Any:
    return await served.sync(lambda client: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4))


async def test_load_serve_and_unload_a_model_with_the_key(admin: Served,
                                                          model_path: str) -> None:
    loaded = await admin.post("/v1/models/load", headers=_headers(KEY),
                              json={"path": model_path, "alias": "second"})
    assert loaded.status_code == 200, loaded.text
    card = loaded.json()
    assert (card["id"], card["state"], card["max_model_len"]) == ("second", "ready", 2048)
    assert await _aliases(admin) == ["tiny", "second"]
    assert (await _chat(admin, "second")).choices[0].finish_reason in ("length", "stop")

    unloaded = await admin.post("/v1/models/unload", headers=_headers(KEY),
                                json={"alias": "second"})
    assert unloaded.status_code == 200
    assert unloaded.json() == {"id": "second", "deleted": True, "object": "model"}
    assert await _aliases(admin) == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        await _chat(admin, "second")
    await _chat(admin, "tiny")


@pytest.mark.parametrize("headers", [
    {}, _headers("wrong-key-wrong-key"), _headers(KEY + "x"), {"authorization": KEY},
    {"authorization": f"Basic {KEY}"},
])
async def test_a_missing_or_wrong_key_is_401_and_changes_nothing(
        admin: Served, model_path: str, headers: dict[str, str]) -> None:
    for path, body in (("/v1/models/load", {"path": model_path, "alias": "second"}),
                       ("/v1/models/unload", {"alias": "tiny"})):
        refused = await admin.post(path, headers=headers, json=body)
        assert refused.status_code == 401, refused.text
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "InvalidRequest")
        assert "server.admin_api_key" in error["message"]
        assert await _aliases(admin) == ["tiny"]
    await _chat(admin, "tiny")


async def test_bad_bodies_and_paths_are_client_errors(admin: Served, tmp_path: Any) -> None:
    cases = [
        ("/v1/models/load", {"alias": "x"}, 400, "InvalidParams"),
        ("/v1/models/load", {"path": str(tmp_path / "nowhere")}, 400, "ModelLoadError"),
        ("/v1/models/load", {"path": str(tmp_path), "alias": "empty"}, 400, "ModelLoadError"),
        ("/v1/models/unload", {"alias": "nope"}, 404, "ModelNotLoaded"),
        ("/v1/models/unload", {"alias": "tiny", "extra": 1}, 400, "InvalidParams"),
    ]
    for path, body, status, code in cases:
        refused = await admin.post(path, headers=_headers(KEY), json=body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (status, code), body
        assert await _aliases(admin) == ["tiny"]
    await _chat(admin, "tiny")


async def test_the_admin_routes_are_off_without_a_key(model_path: str) -> None:
    async with open_runtime(config_from_mapping({}), models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        refused = await served.post("/v1/models/load", headers=_headers(KEY),
                                    json={"path": model_path, "alias": "second"})
        assert refused.status_code == 404
        assert "set server.admin_api_key" in refused.json()["error"]["message"]
        assert await _aliases(served) == ["tiny"]
        await _chat(served, "tiny")
        served.metrics.close()


def test_a_short_admin_key_is_a_config_error() -> None:
    with pytest.raises(Exception, match="admin_api_key"):
        config_from_mapping({"server": {"admin_api_key": "short"}})


@pytest.mark.parametrize("key", [" " * 16, " padded-key-12345 ", "tab\tkey-0123456789",
                                 "new\nline-0123456789", "clé-secrète-0123456", "x" * 15])
def test_an_admin_key_no_client_could_send_is_refused_by_check_config(
        tmp_path: Path, key: str) -> None:
    """A key goes in an Authorization header: visible ASCII only, 16 or more."""
    path = tmp_path / "runtime.yaml"
    path.write_text(yaml.safe_dump({"server": {"admin_api_key": key}}), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "corral.cli", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: server.admin_api_key: expected "), result.stderr
    config_from_mapping({"server": {"admin_api_key": KEY}})
