"""Issue 21, item 2: only the model's failures count against its breaker. A Timeout
from a deadline the client chose (`timeout_ms`) is not one, and neither is a
cancellation; before the fix, five requests with `timeout_ms: 30` opened the breaker
and every other client got 503 CircuitOpen for 10 s.
"""

from __future__ import annotations

import pytest
import trio

from corral.config import config_from_mapping
from corral.runtime import open_runtime
from test_http import serve_http

pytestmark = pytest.mark.slow

# Long enough that a 30 ms deadline always ends the request while it generates.
LONG = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1800,
        "logit_bias": {"0": -100, "1": -100, "2": -100}}


async def test_client_deadlines_never_open_the_breaker_for_others(model_path: str) -> None:
    config = config_from_mapping({"calls": {"circuit_breaker": {"failure_threshold": 2}}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        for _ in range(5):
            timed_out = await served.post("/v1/completions", json={**LONG, "timeout_ms": 30})
            assert timed_out.status_code == 504, timed_out.text
            assert timed_out.json()["error"]["code"] == "Timeout"
        (model,) = rt.list_models()
        assert model.breaker == "closed"
        assert (await rt.statistics()).resilience is not None
        # A client that cancels says nothing about the model either.
        for _ in range(3):
            with trio.move_on_after(0.05):
                async with rt.generate("tiny", prompt="Hi", max_tokens=1800) as stream:
                    async for _chunk in stream:
                        pass
        assert rt.list_models()[0].breaker == "closed"
        served_next = await served.post("/v1/completions", json={
            "model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert served_next.status_code == 200, served_next.text
        served.metrics.close()
