"""Hostile clients on the HTTP transport (issue 21, items 6, 7 and 10, and timeouts).

A real server on 127.0.0.1. Each test sends what a hostile or careless client sends (a
megabyte of tools, a body over the limit, bodies that never finish, bodies refused
before they are read), checks what that client sees, that no traceback is logged, and
that the next request is served. Time is only ever compared with itself: the longest
pause of a running stream against the length of the refused request beside it.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import structlog
import trio
import trio.testing

from corral.config import config_from_mapping
from corral.protocol.errors import Code, TimeoutError
from corral.resilience.retries import RetryPolicy
from corral.resilience.retries import call as retry_call
from corral.runtime import Runtime, open_runtime
from corral.server.http import HttpLimits, HttpServer
from corral.server.jsonrpc import JsonRpcListener
from corral.server.lingering import LingeringStream
from corral.tiny import make_tiny_model
from test_edge_validation import HttpConnection, serving_http
from test_jsonrpc_server import PROMPT, Client, assert_nothing_restarted

pytestmark = pytest.mark.slow

BODY = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 3}).encode()
KEY = "s3cret-admin-key-0123"
MB = 1_000_000


@asynccontextmanager
async def served(model_path: str, limits: HttpLimits | None = None,
                 **server: Any) -> AsyncIterator[tuple[Runtime, HttpServer]]:
    config = config_from_mapping({"supervision": {"backoff": {"min_ms": 1, "max_ms": 10}},
                                  "server": server})
    async with open_runtime(config, models={"tiny": model_path}) as rt, \
            serving_http(rt, limits) as http:
        yield rt, http


@contextmanager
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[list[Any]]:
    """Fails the test if anything is logged at error level (structlog or logging, a
    traceback included) or the transport restarts; yields the structlog events."""
    with caplog.at_level(logging.WARNING), structlog.testing.capture_logs() as events:
        yield events
    errors = [e for e in events if e["log_level"] in ("error", "critical")
              or e["event"] == "actor.exited"]
    assert errors == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def completion(http: HttpServer) -> int:
    """A completion on a new connection; its status."""
    connection = await HttpConnection.open(http.port)
    reply = await connection.request("POST", "/v1/completions", BODY)
    await connection.aclose()
    return reply.status


# -- how a connection ends (LingeringStream) ------------------------------------------------


def _pair() -> tuple[LingeringStream, trio.SocketStream]:
    ours, theirs = trio.socket.socketpair()
    return LingeringStream(trio.SocketStream(ours)), trio.SocketStream(theirs)


async def test_an_eof_never_races_a_send_and_a_close_ends_a_stuck_send() -> None:
    """Hypercorn sends EOF and closes from one task while another sends: on a trio
    SocketStream that raised BusyResourceError, which crashed the HTTP server."""
    with trio.fail_after(10):
        wire, client = _pair()
        outcomes: list[str] = []

        async def send(data: bytes) -> None:
            try:
                await wire.send_all(data)
                outcomes.append("sent")
            except trio.ClosedResourceError:
                outcomes.append("closed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, b"x" * (16 * MB))  # more than the buffers hold
            await trio.testing.wait_all_tasks_blocked()
            await wire.send_eof()  # during the send: deferred, not BusyResourceError
            nursery.start_soon(send, b"late")
            await trio.testing.wait_all_tasks_blocked()
            await wire.aclose()  # ends the stuck send
        assert sorted(outcomes) == ["closed", "closed"]
        await wire.linger_and_close()
        received = 0
        while data := await client.receive_some(MB):
            received += len(data)
        assert 0 < received < 16 * MB  # what went before the close, then EOF


async def test_a_closing_connection_reads_what_its_client_still_sends() -> None:
    """A reply that goes out before the client has sent its whole body reaches the
    client: closing with unread input would reset it away."""
    with trio.fail_after(10):
        wire, client = _pair()
        await client.send_all(b"h")
        await wire.receive_some(1)  # the request's head, say; its body is not wanted
        reply = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"

        async def upload() -> None:
            for _ in range(32):
                await client.send_all(b"b" * 65536)
            await client.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await wire.send_all(reply)
            await wire.send_eof()
            await wire.aclose()
            nursery.start_soon(wire.linger_and_close)
        received = b""
        while data := await client.receive_some(MB):
            received += data
        assert received == reply


# -- item 7: bodies that never finish ----------------------------------------------------


async def test_a_dozen_slow_bodies_get_408_without_a_traceback_and_neighbours_are_served(
        model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    limits = HttpLimits(body_timeout_ms=300, keep_alive_timeout_ms=5000)
    with trio.fail_after(60), no_errors_logged(caplog):
        async with served(model_path, limits) as (rt, http):
            heads: list[bytes] = []
            statuses: list[int] = []

            async def slow(index: int) -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", http.port)
                await stream.send_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                                      b"content-length: 1000\r\n\r\n" + BODY[:10])
                received = b""
                while data := await stream.receive_some(65536):
                    if not received and index % 2:
                        await stream.send_eof()  # gone as soon as it has its answer
                    received += data
                heads.append(received.partition(b"\r\n\r\n")[0])

            async def neighbour() -> None:
                connection = await HttpConnection.open(http.port)
                for _ in range(4):  # one keep-alive connection, before, during and after
                    statuses.append((await connection.request(
                        "POST", "/v1/completions", BODY)).status)
                    await trio.sleep(0.1)

            async with trio.open_nursery() as nursery:
                for index in range(12):
                    nursery.start_soon(slow, index)
                for _ in range(4):
                    nursery.start_soon(neighbour)
            assert len(heads) == 12
            assert all(head.startswith(b"HTTP/1.1 408 ") for head in heads), heads
            assert all(b"connection: close" in head.lower() for head in heads)
            assert statuses == [200] * 16
            assert await completion(http) == 200
            assert_nothing_restarted(rt)


# -- item 10: refused before the body is read ------------------------------------------------


async def test_a_hundred_1mb_bodies_without_the_key_get_401_and_keep_their_connections(
        model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    body = json.dumps({"path": "x" * MB, "alias": "second"}).encode()
    clients = threading.local()  # one keep-alive client per worker thread

    def refused(index: int) -> str:
        if not hasattr(clients, "client"):
            clients.client = httpx.Client(timeout=30)
        headers = {"content-type": "application/json"}
        if index % 2:
            headers["authorization"] = "Bearer wrong-key-wrong-key"
        try:
            reply = clients.client.post(f"{base}/v1/models/load", content=body,
                                        headers=headers)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        error = reply.json()["error"]
        return f"{reply.status_code} {error['type']}"

    with trio.fail_after(120), no_errors_logged(caplog):
        async with served(model_path, admin_api_key=KEY) as (rt, http):
            base = f"http://127.0.0.1:{http.port}"
            seen: list[str] = []
            workers = trio.CapacityLimiter(8)

            async def one(index: int) -> None:
                seen.append(await trio.to_thread.run_sync(refused, index, limiter=workers))

            async with trio.open_nursery() as nursery:
                for index in range(100):
                    nursery.start_soon(one, index)
            assert seen == ["401 authentication_error"] * 100
            loaded = await trio.to_thread.run_sync(lambda: httpx.post(
                f"{base}/v1/models/load", json={"path": model_path, "alias": "second"},
                headers={"authorization": f"Bearer {KEY}"}, timeout=30))
            assert loaded.status_code == 200, loaded.text
            assert await completion(http) == 200
            assert_nothing_restarted(rt)


# -- item 6: bodies over the limit, and a megabyte of tools ---------------------------------


async def test_a_body_over_max_body_bytes_is_413_and_the_next_request_is_served(
        model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    big = json.dumps({"model": "tiny", "prompt": "x" * (2 * MB)}).encode()

    def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    with trio.fail_after(60), no_errors_logged(caplog):
        async with served(model_path, max_body_bytes=MB) as (_, http):
            base = f"http://127.0.0.1:{http.port}"
            for content in (big, chunks()):
                reply = await trio.to_thread.run_sync(lambda c=content: httpx.post(
                    f"{base}/v1/completions", content=c, timeout=30,
                    headers={"content-type": "application/json"}))
                assert reply.status_code == 413, reply.text
                assert reply.headers["connection"] == "close"
                error = reply.json()["error"]
                assert (error["code"], error["type"], error["retryable"]) == (
                    Code.INVALID_REQUEST.value, "invalid_request_error", False)
                assert "1,000,000 bytes" in error["message"]
                assert "server.max_body_bytes" in error["message"]
            assert await completion(http) == 200


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


async def test_a_megabyte_of_tools_is_refused_while_a_running_stream_flows(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """128 tools nested 200 deep render to ~900k tokens, for a context of 16k: 400. The
    template renders and encodes for seconds, in a worker thread: the running stream
    never pauses for a large part of that (it paused for all of it in the engine
    thread), and it ends complete."""
    model = str(make_tiny_model(tmp_path / "long", context=16384))
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": _nested(200)}}
             for i in range(128)]
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                       "tools": tools, "max_tokens": 5}).encode()
    assert len(body) > MB
    with trio.fail_after(240), no_errors_logged(caplog):
        async with served(model) as (rt, http):
            arrivals: list[float] = []
            async with rt.generate("tiny", PROMPT, max_tokens=3000) as running, \
                    trio.open_nursery() as nursery:

                async def read() -> None:
                    async for chunk in running:
                        assert chunk.token_ids
                        arrivals.append(trio.current_time())

                nursery.start_soon(read)
                while len(arrivals) < 5:
                    await trio.sleep(0.01)
                began = trio.current_time()
                reply = await trio.to_thread.run_sync(lambda: httpx.post(
                    f"http://127.0.0.1:{http.port}/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"}, timeout=120))
                ended = trio.current_time()
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["code"] == Code.INVALID_PARAMS.value
            assert "tokens, model context is 16384" in error["message"]
            assert running.finish_reason == "length"
            during = [t for t in arrivals if began <= t <= ended]
            assert during, "the running stream stopped while the request was refused"
            edges = [began, *during, min(ended, arrivals[-1])]
            longest_pause = max(b - a for a, b in itertools.pairwise(edges))
            assert longest_pause < (ended - began) / 2
            assert await completion(http) == 200


# -- timeouts name what the client called and asked for ------------------------------------


async def test_a_timeout_names_the_public_method_the_timeout_asked_for_and_the_duration(
        model_path: str) -> None:
    with trio.fail_after(60):
        async with served(model_path) as (rt, http):
            listener = JsonRpcListener(rt, "tcp://127.0.0.1:0")
            await rt.start_transport(listener.spec("jsonrpc"))
            connection = await HttpConnection.open(http.port)
            for path, method, body in (
                    ("/v1/chat/completions", "chat.completions",
                     {"messages": [{"role": "user", "content": PROMPT}]}),
                    ("/v1/completions", "completions", {"prompt": PROMPT})):
                reply = await connection.request("POST", path, json.dumps(
                    {"model": "tiny", "max_tokens": 500, "timeout_ms": 1, **body}).encode())
                assert reply.status == 504, reply.body
                error = reply.error
                assert (error["code"], error["retryable"]) == (Code.TIMEOUT.value, True)
                message = error["message"]
                assert message.startswith(f"{method} timed out after "), message
                assert message.endswith("s (timeout 0.001s)"), message
            client = await Client.connect(listener)
            reply = await client.call("complete", {"prompt": PROMPT, "max_tokens": 500,
                                                   "timeout_ms": 1, "request_id": "r-1"})
            data = reply["error"]["data"]
            assert (data["method"], data["timeout"], data["request_id"]) == (
                "complete", 0.001, "r-1")
            assert data["duration"] >= 0.0
            assert reply["error"]["message"].startswith("complete timed out after ")
            assert (await connection.request("POST", "/v1/completions", BODY)).status == 200


async def test_a_retry_whose_deadline_has_passed_reports_no_negative_timeout() -> None:
    with pytest.raises(TimeoutError) as caught:
        await retry_call(RetryPolicy(), trio.sleep_forever,
                         deadline=trio.current_time() - 1.0)
    assert caught.value.timeout == 0.0 and "(timeout 0.000s)" in caught.value.message
