"""Inference API keys and CORS (issue 23, part 4): with `server.api_keys`, every route
but /health, /metrics and the admin routes needs a key, OpenAI's (Responses and
/tokenize included), Anthropic's and Ollama's alike, and a refusal is a 401 in the
route's API's own error shape that leaves the connection usable; with
`server.cors_origins`, a browser's preflight is answered.

The real HTTP server on 127.0.0.1 (and a `corral serve` process for the command line),
driven by the official `openai`, `anthropic` and `ollama` clients, httpx and a raw
socket.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

from corral.config import ConfigError, config_from_mapping
from corral.runtime import open_runtime
from test_anthropic import config
from test_http import Served, serve_http
from test_serve import Server, free_port

pytestmark = pytest.mark.slow

KEY = "sk-corral-test-key-0001"
OTHER = "sk-corral-test-key-0002"
CHAT: list[Any] = [{"role": "user", "content": "Hi"}]
ORIGIN = "https://app.example"

ROUTES: list[tuple[str, str, Any, str, int]] = [
    # method, path, JSON body, the API whose error shape the refusal takes, the status
    # with a good key
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 2},
     "openai", 200),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2}, "openai",
     200),
    ("GET", "/v1/models", None, "openai", 200),
    ("GET", "/v1/models/tiny", None, "openai", 200),
    ("POST", "/v1/responses", {"model": "tiny", "input": "Hi", "max_output_tokens": 2},
     "openai", 200),
    ("GET", "/v1/responses/resp_unknown", None, "openai", 404),
    ("DELETE", "/v1/responses/resp_unknown", None, "openai", 404),
    ("POST", "/tokenize", {"model": "tiny", "prompt": "Hi"}, "openai", 200),
    ("POST", "/detokenize", {"model": "tiny", "tokens": [1, 2]}, "openai", 200),
    ("POST", "/v1/messages", {"model": "tiny", "messages": CHAT, "max_tokens": 2},
     "anthropic", 200),
    ("POST", "/v1/messages/count_tokens", {"model": "tiny", "messages": CHAT}, "anthropic",
     200),
    ("POST", "/api/chat", {"model": "tiny", "messages": CHAT, "stream": False,
                           "options": {"num_predict": 2}}, "ollama", 200),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "Hi", "stream": False,
                               "options": {"num_predict": 2}}, "ollama", 200),
    ("GET", "/api/tags", None, "ollama", 200),
    ("POST", "/api/show", {"model": "tiny"}, "ollama", 200),
    ("GET", "/api/ps", None, "ollama", 200),
    ("GET", "/api/version", None, "ollama", 200),
    ("GET", "/", None, "ollama", 200),
    ("POST", "/api/embed", {"model": "tiny", "input": "Hi"}, "ollama", 404),  # no such route
    ("POST", "/v1/embeddings", {"model": "tiny", "input": "Hi"}, "openai", 404),  # nor here
]


@pytest.fixture
async def keyed(model_path: str) -> AsyncIterator[Served]:
    keys = config(server={"api_keys": [KEY, OTHER], "cors_origins": [ORIGIN],
                          "drain_timeout_ms": 1000})
    async with open_runtime(keys, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        yield served
        served.metrics.close()


async def _request(served: Served, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
    return await trio.to_thread.run_sync(lambda: httpx.request(
        method, f"{served.base_url}{path}", json=body, headers=headers, timeout=30))


def _check_refusal(response: httpx.Response, api: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    if api == "anthropic":
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
        message = body["error"]["message"]
    elif api == "ollama":
        assert list(body) == ["error"]
        message = body["error"]
    else:
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "InvalidRequest"
        message = body["error"]["message"]
    assert "API key" in message and KEY not in message
    assert response.headers["x-request-id"]


async def test_every_inference_route_needs_a_key_in_its_apis_error_shape(
        keyed: Served) -> None:
    for method, path, body, api, status in ROUTES:
        for headers in [None, {"authorization": "Bearer wrong-key-0123456789"},
                        {"x-api-key": KEY[:-1]}, {"authorization": KEY}]:
            _check_refusal(await _request(keyed, method, path, body, headers), api)
        for headers in [{"authorization": f"Bearer {KEY}"}, {"x-api-key": OTHER}]:
            answered = await _request(keyed, method, path, body, headers)
            assert answered.status_code == status, (path, answered.text)
    for path in ["/health", "/metrics"]:
        assert (await _request(keyed, "GET", path)).status_code == 200


async def test_the_official_clients_are_refused_without_the_key_and_served_with_it(
        keyed: Served) -> None:
    def run() -> list[Any]:
        seen: list[Any] = []
        with openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="wrong-key",
                           max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                wrong.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
            seen.append(caught.value)
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
            with pytest.raises(openai.AuthenticationError):
                wrong.responses.create(model="tiny", input="Hi", max_output_tokens=2)
        with anthropic.Anthropic(base_url=keyed.base_url, api_key="wrong-key",
                                 max_retries=0) as wrong_anthropic:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                wrong_anthropic.messages.create(model="tiny", messages=CHAT, max_tokens=2)
            seen.append(refused.value)
        with openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEY,
                           max_retries=0) as right:
            seen.append(right.chat.completions.create(model="tiny", messages=CHAT,
                                                      max_tokens=2))
            seen.append([m.id for m in right.models.list()])
            seen.append(right.responses.create(model="tiny", input="Hi", max_output_tokens=2))
        with anthropic.Anthropic(base_url=keyed.base_url, api_key=OTHER,
                                 max_retries=0) as by_header:
            seen.append(by_header.messages.create(model="tiny", messages=CHAT, max_tokens=2))
        with anthropic.Anthropic(base_url=keyed.base_url, auth_token=KEY,
                                 max_retries=0) as by_bearer:
            seen.append(by_bearer.messages.count_tokens(model="tiny", messages=CHAT))
        with pytest.raises(ollama.ResponseError) as refused_ollama:
            ollama.Client(host=keyed.base_url).chat(model="tiny", messages=CHAT,
                                                    options={"num_predict": 2})
        seen.append(refused_ollama.value)
        keyed_ollama = ollama.Client(host=keyed.base_url,
                                     headers={"Authorization": f"Bearer {KEY}"})
        seen.append(keyed_ollama.chat(model="tiny", messages=CHAT, options={"num_predict": 2}))
        seen.append([part.done for part in keyed_ollama.generate(
            model="tiny", prompt="Hi", stream=True, options={"num_predict": 2})])
        return seen

    (refused, refused_anthropic, chat, models, response, message, counted, refused_ollama,
     ollama_chat, ollama_parts) = await trio.to_thread.run_sync(run)
    assert refused.status_code == 401 and refused.body["code"] == "InvalidRequest"
    assert refused_anthropic.status_code == 401
    assert refused_anthropic.body["error"]["type"] == "authentication_error"
    assert chat.choices[0].finish_reason == "length"
    assert models == ["tiny"]
    assert message.stop_reason == "max_tokens"
    assert counted.input_tokens > 0
    assert response.status == "incomplete"
    assert refused_ollama.status_code == 401 and "API key" in refused_ollama.error
    assert ollama_chat.done and ollama_chat.done_reason == "length"
    assert ollama_parts[-1] is True


async def _exchange(stream: trio.SocketStream, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on an open connection; its status and body."""
    await stream.send_all(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some()
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    while len(body) < length:
        body += await stream.receive_some()
    return int(lines[0].split()[1]), body


def _post(path: str, body: bytes, headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{headers}\r\n").encode() + body


async def test_a_refused_request_keeps_its_keep_alive_connection(keyed: Served) -> None:
    """The refused body is read before the 401, so the next request on the same
    connection is served."""
    padding = "x" * 200_000
    refused_body = json.dumps({"model": "tiny", "messages": [
        {"role": "user", "content": padding}], "max_tokens": 2}).encode()
    served_body = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 2}).encode()
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream("127.0.0.1", keyed.port)
        async with stream:
            status, body = await _exchange(stream, _post("/v1/messages", refused_body))
            assert status == 401
            assert json.loads(body)["error"]["type"] == "authentication_error"
            status, body = await _exchange(
                stream, _post("/v1/messages", served_body, f"x-api-key: {KEY}\r\n"))
            assert status == 200, body
            assert json.loads(body)["stop_reason"] == "max_tokens"


async def test_a_cors_preflight_is_answered_for_an_allowed_origin(keyed: Served) -> None:
    def preflight(path: str, origin: str, headers: str) -> httpx.Response:
        return httpx.options(f"{keyed.base_url}{path}", timeout=10, headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": headers})

    allowed = await trio.to_thread.run_sync(
        preflight, "/v1/chat/completions", ORIGIN, "authorization, content-type")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    anthropic_preflight = await trio.to_thread.run_sync(
        preflight, "/v1/messages", ORIGIN, "x-api-key, anthropic-version, content-type")
    assert anthropic_preflight.status_code == 200
    assert "x-api-key" in anthropic_preflight.headers["access-control-allow-headers"].lower()
    other = await trio.to_thread.run_sync(
        preflight, "/v1/chat/completions", "https://evil.example", "authorization")
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    # The replies carry the header too, a refusal included, so the page can read them.
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
    refused = await _request(keyed, "POST", "/v1/chat/completions", body, {"origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    answered = await _request(keyed, "POST", "/v1/chat/completions", body,
                              {"origin": ORIGIN, "authorization": f"Bearer {KEY}"})
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answered.headers["access-control-expose-headers"].lower()


async def test_without_keys_or_origins_the_api_is_open_and_has_no_cors(model_path: str) -> None:
    async with open_runtime(config(), models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        answered = await _request(served, "POST", "/v1/messages",
                                  {"model": "tiny", "messages": CHAT, "max_tokens": 2},
                                  {"origin": ORIGIN})
        assert answered.status_code == 200
        assert "access-control-allow-origin" not in answered.headers
        preflight = await trio.to_thread.run_sync(lambda: httpx.options(
            f"{served.base_url}/v1/chat/completions", timeout=10,
            headers={"origin": ORIGIN, "access-control-request-method": "POST"}))
        assert preflight.status_code == 405
        assert "access-control-allow-origin" not in preflight.headers
        served.metrics.close()


def test_keys_and_origins_are_checked_by_the_config() -> None:
    with pytest.raises(ConfigError) as short:
        config_from_mapping({"server": {"api_keys": [KEY, "short"]}})
    assert any(e.startswith("server.api_keys[1]:") for e in short.value.errors), short.value
    with pytest.raises(ConfigError) as spaced:
        config_from_mapping({"server": {"api_keys": ["a key with spaces in it"]}})
    assert any(e.startswith("server.api_keys[0]:") for e in spaced.value.errors)
    with pytest.raises(ConfigError) as origin:
        config_from_mapping({"server": {"cors_origins": ["app.example/path"]}})
    assert any(e.startswith("server.cors_origins[0]:") for e in origin.value.errors)
    valid = config_from_mapping({"server": {"api_keys": [KEY], "cors_origins": ["*"]}})
    assert valid.server.api_keys == (KEY,) and valid.server.cors_origins == ("*",)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_corral_serve_takes_keys_from_api_key_and_corral_api_key(
        model_path: str, how: str) -> None:
    port = free_port()
    args = ["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"]
    if how == "flag":
        server = Server([*args, "--api-key", KEY, "--api-key", OTHER])
    else:
        server = Server(args, env={"CORRAL_API_KEY": f"{KEY} {OTHER}"})
    try:
        server.wait_ready()
        base = f"http://127.0.0.1:{port}"
        for key in (KEY, OTHER):
            with anthropic.Anthropic(base_url=base, api_key=key, max_retries=0) as client:
                reply = client.messages.create(model="tiny", messages=CHAT, max_tokens=2)
            assert reply.stop_reason == "max_tokens"
        with (openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0) as client,
              pytest.raises(openai.AuthenticationError)):
            client.models.list()
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        server.stop()
