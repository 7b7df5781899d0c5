"""The JSON-RPC server on the real tiny model: in-process over TCP (and a unix socket),
and as a subprocess on stdio.

Every method, batches, every kind of bad input (each answered with its typed error while
the connection, or the next one, keeps working and nothing restarts), streams cancelled
by `cancel` and by a closed connection, the per-connection limits, and the transport
failure domain. MLX computes in real time, so waits are bounded with `fail_after`.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import ERROR_TABLE, Code
from corral.protocol.jsonrpc import Method
from corral.runtime import Runtime, open_runtime
from corral.server.jsonrpc import JsonRpcListener

PROMPT = "The quick brown fox"
MAX_LINE = 4096
MAX_PENDING = 4
LONG = 2000  # tokens: several seconds of generation, always cancelled long before the end


def _config() -> RuntimeConfig:
    return config_from_mapping({
        "json_rpc": {"max_line_bytes": MAX_LINE, "max_pending_per_connection": MAX_PENDING},
        "stream_registry": {"max_active_streams": 16, "max_queued": 4},
        "supervision": {"backoff": {"min_ms": 1, "max_ms": 10}},
    })


@asynccontextmanager
async def serve(model_path: str, uri: str = "tcp://127.0.0.1:0", **options: Any
                ) -> AsyncIterator[tuple[Runtime, JsonRpcListener]]:
    async with open_runtime(_config(), models={"tiny": model_path}) as rt:
        listener = JsonRpcListener(rt, uri, **options)
        await rt.start_transport(listener.spec("jsonrpc"))
        yield rt, listener


class Client:
    """A newline-delimited JSON-RPC client over any pair of trio streams."""

    def __init__(self, send: trio.abc.SendStream, receive: trio.abc.ReceiveStream) -> None:
        self.send_stream = send
        self.receive_stream = receive
        self.notifications: list[dict[str, Any]] = []
        self._buffer = bytearray()
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, listener: JsonRpcListener) -> Client:
        assert listener.port is not None
        stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
        return cls(stream, stream)

    async def aclose(self) -> None:
        await self.send_stream.aclose()
        await self.receive_stream.aclose()

    async def send(self, data: bytes) -> None:
        await self.send_stream.send_all(data)

    async def request(self, method: str, params: Any = None, *, id: Any = None) -> Any:
        rid = next(self._ids) if id is None else id
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            message["params"] = params
        await self.send(json.dumps(message).encode() + b"\n")
        return rid

    async def line(self) -> bytes | None:
        """The next line, or None at the end of input."""
        while (newline := self._buffer.find(b"\n")) < 0:
            data = await self.receive_stream.receive_some(65536)
            if not data:
                assert not self._buffer, f"cut line from the server: {bytes(self._buffer)!r}"
                return None
            self._buffer += data
        line = bytes(self._buffer[:newline])
        del self._buffer[:newline + 1]
        return line

    async def message(self) -> Any:
        line = await self.line()
        assert line is not None, "the server closed the connection"
        return json.loads(line)

    async def reply(self) -> Any:
        """The next reply (or batch reply); notifications on the way are kept."""
        while True:
            message = await self.message()
            if isinstance(message, dict) and "id" not in message:
                self.notifications.append(message)
                continue
            return message

    async def call(self, method: str, params: Any = None) -> Any:
        """The whole reply of one request, which must be the next reply."""
        rid = await self.request(method, params)
        reply = await self.reply()
        assert reply["id"] == rid, reply
        return reply

    async def result(self, method: str, params: Any = None) -> Any:
        reply = await self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    async def stream_end(self, stream_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Read until the stream's stream.end or stream.error: (chunks, terminal)."""
        chunks: list[dict[str, Any]] = []
        pending = [n for n in self.notifications if n["params"]["stream_id"] == stream_id]
        self.notifications = [n for n in self.notifications if n not in pending]
        while True:
            message = pending.pop(0) if pending else await self.message()
            assert "id" not in message, message
            if message["params"]["stream_id"] != stream_id:
                self.notifications.append(message)
                continue
            if message["method"] == "stream.chunk":
                chunks.append(message["params"])
            else:
                return chunks, message

    async def first_chunk(self, stream_id: int) -> dict[str, Any]:
        while True:
            message = await self.message()
            if message.get("method") == "stream.chunk" and \
                    message["params"]["stream_id"] == stream_id:
                return message["params"]


def error_code(reply: dict[str, Any]) -> Code:
    """The reply's error code, checked against the table: a typed error or a failure."""
    assert reply["jsonrpc"] == "2.0" and "result" not in reply, reply
    error = reply["error"]
    code = Code(error["data"]["code"])
    assert error["code"] == ERROR_TABLE[code].jsonrpc
    assert isinstance(error["message"], str) and error["message"]
    return code


def assert_typed_errors(message: Any) -> None:
    for member in message if isinstance(message, list) else [message]:
        error_code(member)


def assert_nothing_restarted(rt: Runtime) -> None:
    assert rt.actor("root/transport").statistics().restarts == 0
    assert rt.actor("root/transport/jsonrpc").statistics().restarts == 0
    transport = rt.domain("transport")
    assert transport is not None
    assert transport.statistics().total_restarts == 0


async def registry_active(rt: Runtime) -> int:
    return (await rt.statistics()).registry.active


async def wait_no_streams(rt: Runtime) -> None:
    while await registry_active(rt) or rt.health().active_streams:
        await trio.sleep(0.01)


# -- every method ---------------------------------------------------------------------


async def exercise_every_method(client: Client, model_path: str) -> None:
    """Every method but shutdown, on a server that has the model `tiny` loaded."""
    info = await client.result("runtime/info")
    assert info["name"] == "corral" and info["version"]
    assert info["methods"] == [method.value for method in Method]
    assert info["models"] == ["tiny"]
    assert info["limits"]["max_line_bytes"] == MAX_LINE
    assert info["limits"]["max_pending_per_connection"] == MAX_PENDING

    state = await client.result("runtime/state")
    assert state["actors"]["root/transport/jsonrpc"]["state"] == "running"
    assert state["registry"]["active"] == 0

    health = await client.result("health")
    assert health["ok"] is True
    assert {d["name"] for d in health["domains"]} == {"stream_registry", "generation",
                                                      "transport"}

    models = await client.result("list_models")
    assert [(m["alias"], m["state"]) for m in models] == [("tiny", "ready")]

    ids = (await client.result("tokenize", {"model": "tiny", "text": PROMPT}))["token_ids"]
    assert ids and all(isinstance(i, int) for i in ids)
    assert (await client.result("tokenize", ["tiny", PROMPT]))["token_ids"] == ids
    text = (await client.result("detokenize", {"model": "tiny", "token_ids": ids}))["text"]
    assert PROMPT in text

    completion = await client.result("complete", {"prompt": PROMPT, "max_tokens": 12})
    assert completion["finish_reason"] in ("length", "stop")
    assert completion["usage"]["prompt_tokens"] == len(ids)

    started = await client.result("generate", {"model": "tiny", "prompt": PROMPT,
                                               "max_tokens": 12})
    chunks, end = await client.stream_end(started["stream_id"])
    assert end["method"] == "stream.end"
    assert "".join(c["text"] for c in chunks) == completion["text"]
    assert end["params"]["usage"]["completion_tokens"] == len(completion["token_ids"])

    started = await client.result("generate", {"prompt": PROMPT, "max_tokens": LONG})
    await client.first_chunk(started["stream_id"])
    assert await client.result("cancel", {"stream_id": started["stream_id"]}) == {
        "stream_id": started["stream_id"], "cancelled": True}
    _, end = await client.stream_end(started["stream_id"])
    assert end["params"]["finish_reason"] == "cancelled"
    assert (await client.result("cancel", [started["stream_id"]]))["cancelled"] is False

    loaded = await client.result("load_model", {"path": model_path, "alias": "tiny2"})
    assert loaded["alias"] == "tiny2" and loaded["state"] == "ready"
    assert [m["alias"] for m in await client.result("list_models")] == ["tiny", "tiny2"]
    assert await client.result("unload_model", {"alias": "tiny2"}) == {
        "alias": "tiny2", "unloaded": True}
    gone = await client.call("tokenize", {"model": "tiny2", "text": "x"})
    assert error_code(gone) is Code.MODEL_NOT_LOADED


async def test_every_method_over_tcp(model_path: str) -> None:
    calls: list[str] = []
    with trio.fail_after(30):
        async with serve(model_path, on_shutdown=lambda: calls.append("shutdown")) as (
                rt, listener):
            client = await Client.connect(listener)
            await exercise_every_method(client, model_path)
            assert not listener.shutdown_requested.is_set()
            assert await client.result("shutdown") == {"shutdown": True}
            assert listener.shutdown_requested.is_set() and calls == ["shutdown"]
            assert await client.result("health")  # the server stops when its owner says
            await client.aclose()
            assert_nothing_restarted(rt)


async def test_stream_notifications_add_up_to_the_completion(model_path: str) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (_, listener):
            client = await Client.connect(listener)
            params = {"prompt": PROMPT, "max_tokens": 40, "request_id": "r1"}
            whole = await client.result("complete", params)
            started = await client.result("generate", params)
            assert started["model"] == "tiny"
            chunks, end = await client.stream_end(started["stream_id"])
            assert [c["index"] for c in chunks] == list(
                itertools.accumulate([0] + [len(c["token_ids"]) for c in chunks[:-1]]))
            assert "".join(c["text"] for c in chunks) == whole["text"]
            assert [i for c in chunks for i in c["token_ids"]] == whole["token_ids"]
            assert end["params"] == {"stream_id": started["stream_id"],
                                     "finish_reason": whole["finish_reason"],
                                     "usage": whole["usage"]}
            usage = whole["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_a_batch_gets_one_array_in_order(model_path: str) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (rt, listener):
            client = await Client.connect(listener)
            batch = [
                {"jsonrpc": "2.0", "method": "tokenize", "params": {"text": PROMPT}, "id": "a"},
                {"jsonrpc": "2.0", "method": "health"},  # a notification: no reply
                {"jsonrpc": "2.0", "method": "nope", "id": "b"},
                {"jsonrpc": "2.0", "id": "c"},
                7,
                {"jsonrpc": "2.0", "method": "generate",
                 "params": {"prompt": PROMPT, "max_tokens": 5}, "id": "d"},
            ]
            await client.send(json.dumps(batch).encode() + b"\n")
            reply = await client.reply()
            assert [m["id"] for m in reply] == ["a", "b", "c", None, "d"]
            assert reply[0]["result"]["token_ids"] == await rt.tokenize("tiny", PROMPT)
            assert error_code(reply[1]) is Code.METHOD_NOT_FOUND
            assert error_code(reply[2]) is Code.INVALID_REQUEST
            assert error_code(reply[3]) is Code.INVALID_REQUEST
            # The stream's notifications come after the array that told its id.
            assert not client.notifications
            chunks, end = await client.stream_end(reply[4]["result"]["stream_id"])
            assert end["method"] == "stream.end" and chunks

            notifications_only = [{"jsonrpc": "2.0", "method": "health"},
                                  {"jsonrpc": "2.0", "method": "cancel", "params": [99]}]
            await client.send(json.dumps(notifications_only).encode() + b"\n")
            await client.send(b"[]\n")
            assert error_code(await client.reply()) is Code.INVALID_REQUEST  # no reply before
            assert (await client.result("health"))["ok"]


# -- bad input ------------------------------------------------------------------------


async def test_bad_requests_get_typed_errors_and_the_connection_keeps_working(
        model_path: str) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (rt, listener):
            client = await Client.connect(listener)

            await client.send(b'{"jsonrpc": "2.0", "method": "health", "id": 1,,}\n')
            reply = await client.reply()
            assert error_code(reply) is Code.PARSE_ERROR and reply["id"] is None
            assert reply["error"]["code"] == -32700

            reply = await client.call("generate", {"prompt": PROMPT, "max_tokens": "many"})
            assert error_code(reply) is Code.INVALID_PARAMS
            assert reply["error"]["code"] == -32602
            assert reply["error"]["data"]["field"] == "max_tokens"
            assert "max_tokens" in reply["error"]["message"]

            reply = await client.call("tokenize", {"text": 5})
            assert reply["error"]["data"]["field"] == "text"
            reply = await client.call("health", {"verbose": True})
            assert error_code(reply) is Code.INVALID_PARAMS
            reply = await client.call("cancel", {"stream_id": "x"})
            assert reply["error"]["data"]["field"] == "stream_id"

            reply = await client.call("runtime/explode")
            assert error_code(reply) is Code.METHOD_NOT_FOUND
            assert reply["error"]["code"] == -32601

            await client.send(b'{"jsonrpc": "1.0", "method": "health", "id": 9}\n')
            reply = await client.reply()
            assert error_code(reply) is Code.INVALID_REQUEST and reply["id"] == 9

            reply = await client.call("complete", {"model": "ghost", "prompt": PROMPT})
            assert error_code(reply) is Code.MODEL_NOT_LOADED

            await client.send(b"\n  \n")  # blank lines are skipped, not answered
            assert (await client.result("health"))["ok"]
            assert_nothing_restarted(rt)


async def test_a_line_over_the_limit_is_refused_and_the_connection_goes_on(
        model_path: str) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (rt, listener):
            client = await Client.connect(listener)
            text = "x" * (MAX_LINE * 3)
            huge = json.dumps({"jsonrpc": "2.0", "method": "tokenize",
                               "params": {"text": text}, "id": 1}).encode()
            for piece in range(0, len(huge), 1000):  # arrives in pieces, as over a network
                await client.send(huge[piece:piece + 1000])
            await client.send(b"\n")
            reply = await client.reply()
            assert error_code(reply) is Code.INVALID_REQUEST and reply["id"] is None
            assert reply["error"]["data"]["max_line_bytes"] == MAX_LINE
            # A long line and a good one in one write: only the long one is refused.
            await client.send(b"[" + b" " * MAX_LINE + b"]\n")
            await client.request("health", id="after")
            assert error_code(await client.reply()) is Code.INVALID_REQUEST
            assert (await client.reply())["id"] == "after"
            # Just within the limit is accepted.
            filler = MAX_LINE - len(json.dumps(
                {"jsonrpc": "2.0", "method": "tokenize", "params": {"text": ""}, "id": 2}))
            assert (await client.result("tokenize", {"text": "y" * filler}))["token_ids"]
            assert_nothing_restarted(rt)


async def test_a_frame_cut_in_half_then_eof(model_path: str) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (rt, listener):
            client = await Client.connect(listener)
            assert (await client.result("health"))["ok"]
            await client.send(b'{"jsonrpc": "2.0", "method": "hea')
            await client.send_stream.send_eof()  # type: ignore[attr-defined]
            reply = await client.reply()
            assert error_code(reply) is Code.PARSE_ERROR and reply["id"] is None
            assert await client.line() is None  # then the server closes
            await client.aclose()
            again = await Client.connect(listener)
            assert (await again.result("health"))["ok"]
            assert_nothing_restarted(rt)


def garbage() -> st.SearchStrategy[bytes]:
    """Random bytes; JSON-ish token soup; JSON values shaped almost like requests; and
    long runs that cross the line limit."""
    tokens = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"\n", b"1", b"null",
                              b"\xff", b'"jsonrpc"', b'"2.0"', b'"method"', b'"id"'])
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    keys = st.sampled_from(["jsonrpc", "method", "params", "id", "x"])
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(keys, inner, max_size=5), max_leaves=12)
    long = st.tuples(st.binary(max_size=16), st.integers(MAX_LINE - 8, 2 * MAX_LINE),
                     st.sampled_from([b"a", b"\n", b" ", b"{"]))
    return (st.binary(max_size=256)
            | st.lists(tokens, max_size=40).map(b"".join)
            | values.map(lambda v: json.dumps(v).encode())
            | long.map(lambda t: t[0] + t[2] * t[1]))


async def send_garbage_then_probe(client: Client, garbage: bytes, probe: str) -> None:
    """Garbage and its newline, then a request that must work: every reply before the
    probe's is a typed error."""
    await client.send(garbage + b"\n")
    await client.request("health", id=probe)
    while True:
        message = await client.reply()
        if isinstance(message, dict) and message.get("id") == probe:
            assert message["result"]["ok"], message
            return
        assert_typed_errors(message)


def fuzz(example: Callable[[bytes], Awaitable[None]], max_examples: int) -> Callable[[], None]:
    """A hypothesis test, to run in a worker thread, that calls `example` back in this
    trio run for each garbage input: one runtime (or subprocess) serves all examples."""
    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(garbage())
    def examples(data: bytes) -> None:
        trio.from_thread.run(example, data)

    return examples


async def test_garbage_bytes_get_only_typed_errors(model_path: str) -> None:
    with trio.fail_after(60):
        async with serve(model_path) as (rt, listener):
            shared = await Client.connect(listener)
            probes = itertools.count()

            async def one(data: bytes) -> None:
                with trio.fail_after(5):
                    await send_garbage_then_probe(shared, data, f"probe-{next(probes)}")
                    # On a fresh connection: garbage, maybe cut short, then the end.
                    fresh = await Client.connect(listener)
                    await fresh.send(data)
                    await fresh.send_stream.send_eof()  # type: ignore[attr-defined]
                    while (line := await fresh.line()) is not None:
                        assert_typed_errors(json.loads(line))
                    await fresh.aclose()

            await trio.to_thread.run_sync(fuzz(one, 60))
            assert next(probes) > 30  # hypothesis did run (fewer if it ran out of ideas)
            assert (await shared.result("health"))["ok"]
            assert_nothing_restarted(rt)
            assert listener.statistics().accepted >= 2


# -- streams and limits ---------------------------------------------------------------


async def test_a_connection_closed_mid_stream_cancels_its_stream(model_path: str) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (rt, listener):
            client = await Client.connect(listener)
            started = await client.result("generate", {"prompt": PROMPT, "max_tokens": LONG})
            await client.first_chunk(started["stream_id"])
            assert await registry_active(rt) == 1
            await client.aclose()
            with trio.fail_after(5):
                await wait_no_streams(rt)
                while listener.statistics().open:
                    await trio.sleep(0.01)
            assert_nothing_restarted(rt)


async def test_pending_requests_beyond_the_limit_are_overloaded(model_path: str) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (rt, listener):
            client = await Client.connect(listener)
            batch = [{"jsonrpc": "2.0", "method": "runtime/state", "id": i}
                     for i in range(MAX_PENDING + 2)]
            await client.send(json.dumps(batch).encode() + b"\n")
            reply = await client.reply()
            assert all("result" in m for m in reply[:MAX_PENDING])
            for member in reply[MAX_PENDING:]:
                assert error_code(member) is Code.OVERLOADED
                assert member["error"]["data"]["retry_after_ms"] > 0
                assert member["error"]["data"]["retryable"] is True

            # A stream holds its slot until it ends; cancel needs none, so it frees one.
            streams = [(await client.result("generate", {"prompt": PROMPT,
                                                         "max_tokens": LONG}))["stream_id"]
                       for _ in range(MAX_PENDING)]
            assert error_code(await client.call("health")) is Code.OVERLOADED
            assert (await client.result("cancel", {"stream_id": streams[0]}))["cancelled"]
            _, end = await client.stream_end(streams[0])
            assert end["params"]["finish_reason"] == "cancelled"
            assert (await client.result("health"))["ok"]
            await client.aclose()
            with trio.fail_after(5):
                await wait_no_streams(rt)
            assert_nothing_restarted(rt)


async def test_killing_another_transport_child_leaves_a_stream_alone(
        model_path: str, record_events: Any) -> None:
    with trio.fail_after(30):
        async with serve(model_path) as (rt, listener):
            events = record_events(rt)
            other = JsonRpcListener(rt, "tcp://127.0.0.1:0")
            await rt.start_transport(other.spec("jsonrpc-b"))
            bystander = await Client.connect(other)
            assert (await bystander.result("health"))["ok"]

            client = await Client.connect(listener)
            started = await client.result("generate", {"prompt": PROMPT, "max_tokens": 600})
            first = await client.first_chunk(started["stream_id"])
            transport = rt.domain("transport")
            transport.kill_child("jsonrpc-b")  # type: ignore[union-attr]
            await events.wait("restarted", "root/transport/jsonrpc-b")
            assert rt.health().active_streams == 1  # still streaming meanwhile
            assert await bystander.line() is None  # its connections went with it

            chunks, end = await client.stream_end(started["stream_id"])
            chunks.insert(0, first)
            assert end["method"] == "stream.end", end
            assert end["params"]["finish_reason"] == "length"
            assert sum(len(c["token_ids"]) for c in chunks) == 600
            assert [c["index"] for c in chunks] == list(
                itertools.accumulate([0] + [len(c["token_ids"]) for c in chunks[:-1]]))

            assert rt.actor("root/transport/jsonrpc").statistics().restarts == 0
            assert rt.actor("root/transport/jsonrpc-b").statistics().restarts == 1
            assert rt.actor("root/transport").statistics().restarts == 0
            again = await Client.connect(other)  # restarted, on a port of its own
            assert (await again.result("health"))["ok"]
            assert (await client.result("health"))["ok"]


async def test_a_crashed_connection_handler_takes_down_only_its_connection(
        model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (rt, listener):
            doomed = await Client.connect(listener)
            other = await Client.connect(listener)
            started = await other.result("generate", {"prompt": PROMPT, "max_tokens": 300})

            def bug() -> None:
                raise ValueError("a bug, not bad input")

            monkeypatch.setattr(rt, "health", bug)
            reply = await doomed.call("health")
            assert error_code(reply) is Code.INTERNAL_ERROR
            assert await doomed.line() is None  # let it crash: its connection goes
            monkeypatch.undo()

            chunks, end = await other.stream_end(started["stream_id"])
            assert end["params"]["finish_reason"] == "length"
            assert sum(len(c["token_ids"]) for c in chunks) == 300
            assert (await other.result("health"))["ok"]
            assert_nothing_restarted(rt)


async def test_a_graceful_stop_answers_the_requests_in_flight(model_path: str) -> None:
    with trio.fail_after(20):
        async with serve(model_path) as (rt, listener):
            client = await Client.connect(listener)
            rid = await client.request("complete", {"prompt": PROMPT, "max_tokens": 60})
            while not await registry_active(rt):
                await trio.sleep(0.001)
        reply = await client.reply()  # the runtime has stopped by now
        assert reply["id"] == rid and len(reply["result"]["token_ids"]) == 60
        assert await client.line() is None


async def test_unix_socket(model_path: str, tmp_path: Path) -> None:
    path = tmp_path / "corral.sock"
    with trio.fail_after(20):
        async with serve(model_path, f"unix://{path}") as (rt, listener):
            assert listener.address == str(path)
            stream = await trio.open_unix_socket(str(path))
            client = Client(stream, stream)
            await client.send(b"not json\n")
            assert error_code(await client.reply()) is Code.PARSE_ERROR
            ids = (await client.result("tokenize", {"text": PROMPT}))["token_ids"]
            assert ids == await rt.tokenize("tiny", PROMPT)
            await client.aclose()
    assert not path.exists()


def test_uri_must_be_tcp_unix_or_stdio() -> None:
    for uri in ("http://x:1", "tcp://host", "tcp://:80", "unix://", "stdin"):
        with pytest.raises(ValueError, match="tcp://HOST:PORT"):
            JsonRpcListener(None, uri)  # type: ignore[arg-type]


# -- stdio, in a subprocess -----------------------------------------------------------

STDIO_SERVER = """
import trio
from corral.config import LoggingConfig, config_from_mapping
from corral.logging import configure_logging
from corral.runtime import open_runtime
from corral.server.jsonrpc import JsonRpcListener

async def main() -> None:
    configure_logging(LoggingConfig(level="warning"))
    config = config_from_mapping({"json_rpc": {"max_line_bytes": %d,
                                               "max_pending_per_connection": %d}})
    async with open_runtime(config) as rt:
        listener = JsonRpcListener(rt, "stdio")
        await rt.start_transport(listener.spec("jsonrpc"))
        print("stray output goes to stderr, never into the protocol")
        await listener.shutdown_requested.wait()

trio.run(main)
""" % (MAX_LINE, MAX_PENDING)


@asynccontextmanager
async def stdio_server(tmp_path: Path) -> AsyncIterator[tuple[trio.Process, Client]]:
    stderr = (tmp_path / "stderr.log").open("wb")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", STDIO_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=stderr)
    assert process.stdin is not None and process.stdout is not None
    try:
        yield process, Client(process.stdin, process.stdout)
    except BaseException:
        print((tmp_path / "stderr.log").read_text(), file=sys.stderr)
        raise
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        stderr.close()


async def test_every_method_and_bad_input_on_stdio(model_path: str, tmp_path: Path) -> None:
    with trio.fail_after(45):
        async with stdio_server(tmp_path) as (process, client):
            loaded = await client.result("load_model", {"path": model_path, "alias": "tiny"})
            assert loaded["state"] == "ready"
            await exercise_every_method(client, model_path)

            await client.send(b"{oops\n")
            reply = await client.reply()
            assert error_code(reply) is Code.PARSE_ERROR and reply["id"] is None
            reply = await client.call("complete", {"prompt": PROMPT, "temperature": "hot"})
            assert reply["error"]["data"]["field"] == "temperature"
            assert error_code(await client.call("nope")) is Code.METHOD_NOT_FOUND
            await client.send(b"x" * (MAX_LINE + 1) + b"\n")
            assert error_code(await client.reply()) is Code.INVALID_REQUEST
            await client.send(b"\x00\xff\xfe garbage\n")
            assert error_code(await client.reply()) is Code.PARSE_ERROR
            probes = itertools.count()

            async def one(data: bytes) -> None:
                with trio.fail_after(5):
                    await send_garbage_then_probe(client, data, f"probe-{next(probes)}")

            await trio.to_thread.run_sync(fuzz(one, 30))
            assert next(probes) > 15

            state = await client.result("runtime/state")
            assert state["actors"]["root/transport"]["restarts"] == 0
            assert state["actors"]["root/transport/jsonrpc"]["restarts"] == 0

            assert await client.result("shutdown") == {"shutdown": True}
            assert await client.line() is None
            assert await process.wait() == 0
    assert "stray output" in (tmp_path / "stderr.log").read_text()


async def test_stdio_half_frame_then_eof_ends_the_server(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with stdio_server(tmp_path) as (process, client):
            assert (await client.result("health"))["ok"]
            await client.send(b'{"jsonrpc": "2.0", "method": "hea')
            await client.send_stream.aclose()
            reply = await client.reply()
            assert error_code(reply) is Code.PARSE_ERROR and reply["id"] is None
            assert await client.line() is None
            assert await process.wait() == 0
