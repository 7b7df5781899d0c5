"""The transport's public surface: `corral.server.build_app` embedded in a server of
one's own (here httpx's in-process ASGI transport), with the defaults it documents."""

from __future__ import annotations

import httpx

from corral.config import config_from_mapping
from corral.runtime import open_runtime
from corral.server import build_app

PROMPT = "The quick brown fox"


async def test_build_app_serves_the_api_with_the_runtimes_defaults(model_path: str) -> None:
    config = config_from_mapping({"stream_registry": {"max_active_streams": 4}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        transport = httpx.ASGITransport(app=build_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://corral") as client:
            models = (await client.get("/v1/models")).json()
            assert [card["id"] for card in models["data"]] == ["tiny"]
            reply = await client.post("/v1/completions",
                                      json={"prompt": PROMPT, "max_tokens": 4})
            assert reply.status_code == 200
            assert 1 <= reply.json()["usage"]["completion_tokens"] <= 4
            bad = await client.post("/v1/completions",
                                    json={"prompt": PROMPT, "temperature": 9})
            assert bad.status_code == 400
            assert bad.json()["error"]["param"] == "temperature"
            metrics = await client.get("/metrics")
            assert "corral_" in metrics.text
