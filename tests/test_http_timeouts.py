"""A request's Timeout over HTTP, as the client sees it: named for the user's operation,
with the timeout the request had and the structured fields JSON-RPC carries too.

The request asks for more tokens than can come before its own deadline of a few ms;
what is checked is the error's shape, never how fast anything ran.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.config import config_from_mapping
from corral.runtime import open_runtime
from test_http import Served, serve_http

_ENDPOINTS = {
    "chat.completions": ("/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Tell me about foxes."}]}),
    "completions": ("/v1/completions", {"prompt": "The quick brown fox"}),
}
_INTERNAL = re.compile(r"Requests|ask_model|Admit|Submit|generate\b|-\d")


@pytest.fixture
async def served(model_path: str) -> AsyncIterator[Served]:
    config = config_from_mapping({"logging": {"level": "error"}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        server = await serve_http(rt)
        yield server
        server.metrics.close()


def _error_of(status: int, text: str) -> dict[str, Any]:
    """The error object of a reply: the body of a 504, or the last event of a stream."""
    if status == 504:
        body = json.loads(text)
    else:
        assert status == 200, text
        events = [line[len("data: "):] for line in text.splitlines()
                  if line.startswith("data: ")]
        body = json.loads(events[-1])
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("operation", list(_ENDPOINTS))
@pytest.mark.parametrize("timeout_ms", [1, 5, 40])
async def test_a_timeout_names_the_operation_and_carries_its_fields(
        served: Served, operation: str, stream: bool, timeout_ms: int) -> None:
    path, body = _ENDPOINTS[operation]
    reply = await served.post(path, json={"model": "tiny", "max_tokens": 2000,
                                          "timeout_ms": timeout_ms, "stream": stream, **body})
    error = _error_of(reply.status_code, reply.text)
    assert error["code"] == "Timeout" and error["retryable"] is True
    message = error["message"]
    match = re.fullmatch(re.escape(operation) + r" timed out after (\d+\.\d{3})s "
                         r"\(timeout (\d+\.\d{3})s\)", message)
    assert match, message
    assert not _INTERNAL.search(message), message
    assert float(match[2]) == timeout_ms / 1000
    details = error["details"]
    assert details["method"] == operation
    assert details["timeout"] == timeout_ms / 1000
    assert details["duration"] >= 0 and f"{details['duration']:.3f}" == match[1]
    assert details["request_id"] == error["request_id"] == reply.headers["x-request-id"]
