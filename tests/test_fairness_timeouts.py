"""No client starves the others, and no client holds the server's sockets for good
(issue 12, items 9, 11 and 12).

Real servers on 127.0.0.1 and misbehaving clients that are bounded: a JSON-RPC
connection that never reads its replies holds at most its streams while another client
is served; the registry gives a freed slot to the client with the fewest streams; an
HTTP body that never completes gets 408, silent and idle connections are closed after
the keep-alive timeout, a connection beyond the cap gets 429, and the drain's 503 says
when to retry. Each test checks what the client sees and that the next request is
served. Waits count events (streams admitted, connections open), never time.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from corral.actors.child_spec import ChildSpec
from corral.actors.ref import ActorRef
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem
from corral.config import RuntimeConfig, StreamRegistryConfig, config_from_mapping
from corral.protocol.errors import Code, OverloadedError
from corral.protocol.messages import SamplingParams
from corral.protocol.serving_messages import Admit, CloseStream, GetRegistryState
from corral.runtime import Runtime, open_runtime
from corral.runtime.stream_buffers import StreamTable
from corral.runtime.streams import StreamRegistry
from corral.server.http import HttpLimits
from corral.server.jsonrpc import JsonRpcListener
from test_edge_validation import HttpConnection, check_error, serving_http
from test_jsonrpc_server import LONG, PROMPT, Client, error_code

BODY = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 3}).encode()


def _config(**sections: dict[str, Any]) -> RuntimeConfig:
    return config_from_mapping({"supervision": {"backoff": {"min_ms": 1, "max_ms": 10}},
                                **sections})


async def until(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll `condition` until it holds; the test's fail_after bounds the wait."""
    while True:
        holds = condition()
        if await holds if inspect.isawaitable(holds) else holds:
            return
        await trio.sleep(0.01)


async def active_is(rt: Runtime, count: int) -> bool:
    return (await rt.statistics()).registry.active == count


# -- item 11: fairness ------------------------------------------------------------------


async def test_a_jsonrpc_client_that_never_reads_holds_only_its_own_streams(
        model_path: str) -> None:
    with trio.fail_after(30):
        config = _config(stream_registry={"max_active_streams": 3, "max_queued": 2})
        async with open_runtime(config, models={"tiny": model_path}) as rt:
            listener = JsonRpcListener(rt, "tcp://127.0.0.1:0", max_streams_per_connection=2)
            await rt.start_transport(listener.spec("jsonrpc"))
            greedy = await Client.connect(listener)
            for rid in (1, 2, 3):  # and it reads nothing, for now
                await greedy.request("generate", {"prompt": PROMPT, "max_tokens": LONG},
                                     id=rid)
            await until(lambda: active_is(rt, 2))

            polite = await Client.connect(listener)
            info = await polite.result("runtime/info")
            assert info["limits"]["max_streams_per_connection"] == 2
            for _ in range(3):
                done = await polite.result("complete", {"prompt": PROMPT, "max_tokens": 4})
                assert done["usage"]["completion_tokens"] == 4

            replies: dict[int, dict[str, Any]] = {}
            while len(replies) < 3:
                message = await greedy.reply()
                replies[message["id"]] = message
            refused = replies[3]
            assert error_code(refused) is Code.OVERLOADED
            assert refused["error"]["data"]["max_streams_per_connection"] == 2
            assert refused["error"]["data"]["retryable"] is True
            assert "2 streams open" in refused["error"]["message"]
            # Its two streams ran all along, and the connection serves its next request.
            for rid in (1, 2):
                stream_id = replies[rid]["result"]["stream_id"]
                cancelled = await greedy.result("cancel", {"stream_id": stream_id})
                assert cancelled["cancelled"] is True
            assert (await greedy.result("health"))["ok"]
            await until(lambda: active_is(rt, 0))
            again = await greedy.result("complete", {"prompt": PROMPT, "max_tokens": 2})
            assert again["usage"]["completion_tokens"] == 2


@asynccontextmanager
async def registry(max_active: int, max_queued: int) -> AsyncIterator[ActorRef]:
    """A stream registry on its own (its model references lead nowhere)."""
    system = ActorSystem()
    config = StreamRegistryConfig(max_active_streams=max_active, max_queued=max_queued)
    tree = Supervisor([ChildSpec(name="stream_registry", factory=lambda: StreamRegistry(
        config, StreamTable(), lambda model: system.ref(f"nowhere/{model}")))])
    async with open_supervisor(tree, system=system) as root:
        yield root.ref("stream_registry")


async def admit(ref: ActorRef, client: str, stream_id: int) -> Any:
    return await ref.ask(Admit(stream_id=stream_id, model="m", timeout_s=60.0, prompt=[1],
                               sampling=SamplingParams(max_tokens=1), client=client))


async def test_the_registry_admits_the_client_with_the_fewest_streams_first() -> None:
    with trio.fail_after(10):
        async with registry(max_active=2, max_queued=3) as ref, \
                trio.open_nursery() as nursery:
            admitted: list[int] = []
            refused: dict[int, OverloadedError] = {}

            async def waiter(client: str, stream_id: int) -> None:
                try:
                    await admit(ref, client, stream_id)
                except OverloadedError as exc:
                    refused[stream_id] = exc
                else:
                    admitted.append(stream_id)

            async def queued(count: int) -> bool:
                return int((await ref.ask(GetRegistryState())).queued) == count

            assert (await admit(ref, "hog", 1)).stream_id == 1
            assert (await admit(ref, "hog", 2)).stream_id == 2
            for waiting, (client, stream_id) in enumerate([("hog", 3), ("hog", 4), ("b", 5)]):
                nursery.start_soon(waiter, client, stream_id)
                await until(functools.partial(queued, waiting + 1))
            # The queue is full. Newcomers take the place of the hog's newest waiters...
            nursery.start_soon(waiter, "c", 6)
            await until(lambda: 4 in refused)
            nursery.start_soon(waiter, "d", 7)
            await until(lambda: 3 in refused)
            assert "gave way to another client's" in refused[4].message
            assert refused[4].details["client_streams"] == 4
            assert refused[4].retry_after_ms >= 0
            # ...but the hog cannot push anyone out: it holds the most already.
            with pytest.raises(OverloadedError):
                await admit(ref, "hog", 8)
            # Freed slots go to the clients with no stream running, in arrival order.
            for closed, expected in [(1, [5]), (2, [5, 6]), (5, [5, 6, 7])]:
                await ref.tell(CloseStream(closed, "stop"))
                await until(lambda: len(admitted) == len(expected))  # noqa: B023 - awaited here
                assert admitted == expected
            assert sorted(refused) == [3, 4]
            assert (await ref.ask(GetRegistryState())).active == 2


STREAM = {"model": "tiny", "prompt": PROMPT, "max_tokens": LONG, "stream": True}


async def _sse_request(port: int, body: dict[str, Any], *,
                       local_host: str | None = None) -> trio.SocketStream:
    """Send a streaming request and read nothing of the reply."""
    sock = trio.socket.socket()
    if local_host is not None:
        await sock.bind((local_host, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    data = json.dumps(body).encode()
    await stream.send_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                          b"content-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (len(data), data))
    return stream


async def test_an_http_client_address_holds_at_most_its_streams(model_path: str) -> None:
    with trio.fail_after(30):
        config = _config(stream_registry={"max_active_streams": 8})
        async with open_runtime(config, models={"tiny": model_path}) as rt, \
                serving_http(rt, HttpLimits(max_streams_per_client=2)) as http:
            greedy = [await _sse_request(http.port, STREAM) for _ in range(2)]
            await until(lambda: active_is(rt, 2))
            connection = await HttpConnection.open(http.port)
            reply = await connection.request("POST", "/v1/completions", BODY)
            error = check_error(reply, 429, Code.OVERLOADED)
            assert "client 127.0.0.1 has 2 generation requests open" in error["message"]
            assert error["retryable"] is True and reply.headers["retry-after"] == "1"
            for stream in greedy:  # it goes away: its generations stop
                await stream.aclose()
            await until(lambda: active_is(rt, 0))
            await until(lambda: http.open_connections == 1)
            reply = await connection.request("POST", "/v1/completions", BODY)
            assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 3


async def test_another_http_client_address_is_served_meanwhile(model_path: str) -> None:
    probe = trio.socket.socket()
    try:
        await probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here")
    finally:
        probe.close()
    with trio.fail_after(30):
        config = _config(stream_registry={"max_active_streams": 8})
        async with open_runtime(config, models={"tiny": model_path}) as rt, \
                serving_http(rt, HttpLimits(max_streams_per_client=2)) as http:
            greedy = [await _sse_request(http.port, STREAM, local_host="127.0.0.2")
                      for _ in range(2)]
            await until(lambda: active_is(rt, 2))
            third = await _sse_request(http.port, STREAM, local_host="127.0.0.2")
            head, body = await _head_and_body(third)
            assert head.startswith(b"HTTP/1.1 429 "), head
            assert json.loads(body)["error"]["code"] == Code.OVERLOADED.value
            connection = await HttpConnection.open(http.port)  # from 127.0.0.1
            for _ in range(3):
                reply = await connection.request("POST", "/v1/completions", BODY)
                assert reply.status == 200, reply.body
            assert await active_is(rt, 2)  # the other address's streams still run
            for stream in [*greedy, third]:
                await stream.aclose()


async def _head_and_body(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """One reply with a content-length, read by hand: its head and its body."""
    received = bytearray()
    while b"\r\n\r\n" not in received:
        received += await stream.receive_some(65536)
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head, body


# -- item 12: read timeouts and the connection cap -------------------------------------

LIMITS = HttpLimits(body_timeout_ms=300, keep_alive_timeout_ms=300, max_connections=3)


async def _closed_by_server(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = bytearray()
    while data := await stream.receive_some(65536):
        received += data
    return bytes(received)


async def test_a_body_that_never_completes_gets_408_and_the_connection_closes(
        model_path: str) -> None:
    with trio.fail_after(30):
        async with open_runtime(_config(), models={"tiny": model_path}) as rt, \
                serving_http(rt, LIMITS) as http:
            stalled = await trio.open_tcp_stream("127.0.0.1", http.port)
            await stalled.send_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                                   b"content-length: 1000\r\n\r\n" + BODY[:10])
            slow = await trio.open_tcp_stream("127.0.0.1", http.port)
            await slow.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                b"content-length: 1000\r\n\r\n")

            async def dribble() -> None:  # a byte at a time, never all of it
                with trio.move_on_after(20):
                    for _ in range(999):
                        await slow.send_all(b" ")
                        await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(dribble)
                for stream in (stalled, slow):
                    head, _, body = (await _closed_by_server(stream)).partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 408 "), head
                    assert b"connection: close" in head.lower()
                    error = json.loads(body)["error"]
                    assert error["code"] == Code.TIMEOUT.value and error["retryable"] is True
                    assert "arrived in 0.3s, not all" in error["message"]
                nursery.cancel_scope.cancel()
            connection = await HttpConnection.open(http.port)
            reply = await connection.request("POST", "/v1/completions", BODY)
            assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 3


async def test_silent_and_idle_connections_are_closed_after_the_keep_alive_timeout(
        model_path: str) -> None:
    with trio.fail_after(30):
        async with open_runtime(_config(), models={"tiny": model_path}) as rt, \
                serving_http(rt, LIMITS) as http:
            silent = await trio.open_tcp_stream("127.0.0.1", http.port)
            half = await trio.open_tcp_stream("127.0.0.1", http.port)
            await half.send_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
            idle = await HttpConnection.open(http.port)  # after a generation, kept alive
            assert (await idle.request("POST", "/v1/completions", BODY)).status == 200
            for stream in (silent, half, idle.stream):
                assert await _closed_by_server(stream) == b""
            await until(lambda: http.open_connections == 0)
            connection = await HttpConnection.open(http.port)
            assert (await connection.request("POST", "/v1/completions", BODY)).status == 200


async def test_a_connection_beyond_the_cap_gets_429_and_later_ones_are_served(
        model_path: str) -> None:
    with trio.fail_after(30):
        async with open_runtime(_config(), models={"tiny": model_path}) as rt, \
                serving_http(rt, LIMITS) as http:
            assert http.max_connections == 3
            silent = [await trio.open_tcp_stream("127.0.0.1", http.port) for _ in range(3)]
            await until(lambda: http.open_connections == 3)
            extra = await trio.open_tcp_stream("127.0.0.1", http.port)
            await extra.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            head, _, body = (await _closed_by_server(extra)).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 "), head
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
            assert headers["retry-after"] == "1" and headers["connection"] == "close"
            error = json.loads(body)["error"]
            assert error["code"] == Code.OVERLOADED.value and error["retryable"] is True
            assert "3 connections open, the most it allows" in error["message"]
            assert http.refused == 1
            for stream in silent:  # the keep-alive timeout frees their places
                assert await _closed_by_server(stream) == b""
            await until(lambda: http.open_connections == 0)
            connection = await HttpConnection.open(http.port)
            assert (await connection.request("POST", "/v1/completions", BODY)).status == 200
            assert (await connection.request("GET", "/health")).status == 200


# -- item 9: the drain's 503 ----------------------------------------------------------------


async def test_the_drains_503_says_when_to_retry(model_path: str) -> None:
    with trio.fail_after(30):
        config = _config(server={"drain_timeout_ms": 2500})
        async with open_runtime(config, models={"tiny": model_path}) as rt, \
                serving_http(rt) as http:
            connection = await HttpConnection.open(http.port)
            async with rt.generate("tiny", PROMPT, max_tokens=LONG) as running, \
                    trio.open_nursery() as nursery:
                cut: list[int] = []

                async def drain() -> None:
                    cut.append(await rt.drain(60.0))

                nursery.start_soon(drain)
                await until(lambda: rt.draining)
                reply = await connection.request("POST", "/v1/completions", BODY)
                error = check_error(reply, 503, Code.SERVER_ERROR)
                assert reply.headers["retry-after"] == "3"
                assert error["retryable"] is True and "shutting down" in error["message"]
                health = await connection.request("GET", "/health")
                assert health.status == 503 and health.headers["retry-after"] == "3"
                assert "shutting down" in health.json()["reasons"]
                # The stream that was running when the drain began is served to its end.
                received = 0
                async for chunk in running:
                    received += len(chunk.token_ids)
            assert running.finish_reason == "length" and received == LONG and cut == [0]
