"""Every value that crosses into msgpack or MLX is range-checked at the edge (issue 12,
item 10).

Integers beyond 64 bits, nan and infinities, long strings and deep nesting, sent to
every JSON-RPC method and to both generation endpoints of a real server on 127.0.0.1,
get a client error that names the field (JSON-RPC -32602 / HTTP 400), never a 5xx or
InternalError; the same connection serves the next request, and the connection's other
streams keep streaming. `HttpConnection` (one keep-alive HTTP/1.1 connection, parsed by
h11) and `serving_http` are shared with test_fairness_timeouts.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.actors.child_spec import ChildSpec
from corral.metrics import Metrics
from corral.protocol.errors import Code
from corral.runtime import Runtime
from corral.server.http import HttpLimits, HttpServer
from test_jsonrpc_server import (
    LONG,
    PROMPT,
    Client,
    assert_nothing_restarted,
    error_code,
    serve,
)

# Codes that blame the server: a client's bad value must never get one.
SERVER_FAULTS = frozenset({Code.INTERNAL_ERROR, Code.SERVER_ERROR, Code.RUNTIME_ERROR,
                           Code.UNKNOWN_ERROR, Code.GENERATION_ERROR, Code.MODEL_LOAD_ERROR,
                           Code.TRANSPORT_ERROR})


# -- a real HTTP server, and one keep-alive connection to it -------------------------------


@asynccontextmanager
async def serving_http(rt: Runtime, limits: HttpLimits | None = None,
                       name: str = "http") -> AsyncIterator[HttpServer]:
    """An HTTP server on 127.0.0.1 (a port of its own) in `rt`'s transport domain."""
    metrics = Metrics(rt)
    server = HttpServer(rt, "127.0.0.1", 0, metrics, limits=limits)
    try:
        await rt.start_transport(ChildSpec(name=name, factory=lambda: server))
        yield server
    finally:
        metrics.close()


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI error object of an error reply."""
        body = self.json()
        assert set(body) == {"error"}, body
        return dict(body["error"])


@dataclass
class HttpConnection:
    """One HTTP/1.1 connection, kept alive between requests; h11 parses the replies."""

    stream: trio.SocketStream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def request(self, method: str, path: str, body: bytes | None = None) -> HttpReply:
        """Send a request and read its whole reply (SSE included); the connection must
        stay open for the next one unless the reply says `connection: close`.

        Raises:
            AssertionError: the server closed the connection without a reply.
        """
        headers = [("host", "127.0.0.1")]
        if body is not None:
            headers += [("content-type", "application/json"),
                        ("content-length", str(len(body)))]
        data = self.h11.send(h11.Request(method=method, target=path, headers=headers)) or b""
        if body:
            data += self.h11.send(h11.Data(data=body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        status, reply_headers, parts = 0, {}, []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                reply_headers = {bytes(k).decode(): bytes(v).decode()
                                 for k, v in event.headers}
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"the server closed the connection: {event!r}")
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return HttpReply(status, reply_headers, b"".join(parts))

    async def aclose(self) -> None:
        await self.stream.aclose()


def check_error(reply: HttpReply, status: int, code: Code) -> dict[str, Any]:
    """The reply is `status` with an error body of `code`; returns the error object."""
    assert reply.status == status, (reply.status, reply.body)
    error = reply.error
    assert error["code"] == code.value, error
    assert error["message"] and error["request_id"] == reply.headers["x-request-id"]
    return error


# -- the reproduction --------------------------------------------------------------


async def test_integers_beyond_64_bits_are_invalid_params_and_other_streams_go_on(
        model_path: str) -> None:
    with trio.fail_after(30):
        async with serve(model_path) as (rt, listener), serving_http(rt) as http:
            client = await Client.connect(listener)
            running = await client.result("generate", {"prompt": PROMPT, "max_tokens": LONG})
            first = await client.first_chunk(running["stream_id"])
            for name, value in [("top_k", 2**70), ("seed", 2**70), ("max_tokens", 2**64),
                                ("stop_token_ids", [2**70]), ("timeout_ms", 2**63),
                                ("prompt", [1, 2**40]), ("temperature", -1.0)]:
                for method in ("complete", "generate"):
                    reply = await client.call(method, {"prompt": PROMPT, name: value})
                    assert error_code(reply) is Code.INVALID_PARAMS, reply
                    assert reply["error"]["code"] == -32602
                    assert reply["error"]["data"]["field"].startswith(name)
                    assert name in reply["error"]["message"]
                    assert reply["error"]["data"]["retryable"] is False
            reply = await client.call("detokenize", {"token_ids": [2**70]})
            assert reply["error"]["data"]["field"] == "token_ids[0]"
            reply = await client.call("cancel", {"stream_id": 2**64})
            assert reply["error"]["data"]["field"] == "stream_id"
            # The stream that ran while the bad requests came still runs, unbroken.
            cancelled = await client.result("cancel", {"stream_id": running["stream_id"]})
            assert cancelled["cancelled"] is True
            chunks, end = await client.stream_end(running["stream_id"])
            assert end["method"] == "stream.end"
            assert end["params"]["finish_reason"] == "cancelled"
            received = [first, *chunks]
            assert [c["index"] for c in received] == list(itertools.accumulate(
                [0] + [len(c["token_ids"]) for c in received[:-1]]))
            assert end["params"]["usage"]["completion_tokens"] >= sum(
                len(c["token_ids"]) for c in received)
            assert (await client.result("complete", {"prompt": PROMPT, "max_tokens": 3}))

            connection = await HttpConnection.open(http.port)
            for name, value in [("top_k", 2**70), ("seed", 2**70), ("max_tokens", 2**64),
                                ("stop_token_ids", [2**70]), ("prompt", [2**70])]:
                body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, name: value}
                error = check_error(await connection.request(
                    "POST", "/v1/completions", json.dumps(body).encode()), 400,
                    Code.INVALID_PARAMS)
                assert error["param"].startswith(name) and name in error["message"]
                assert error["retryable"] is False
            reply = await connection.request("POST", "/v1/chat/completions", json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                 "max_completion_tokens": 2**64}).encode())
            assert check_error(reply, 400, Code.INVALID_PARAMS)["param"] == \
                "max_completion_tokens"
            reply = await connection.request(
                "POST", "/v1/completions",
                b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}')
            error = check_error(reply, 400, Code.PARSE_ERROR)
            assert error["param"] == "temperature" and "out of range" in error["message"]
            ok = await connection.request("POST", "/v1/completions", json.dumps(
                {"model": "tiny", "prompt": PROMPT, "max_tokens": 3}).encode())
            assert ok.status == 200 and ok.json()["usage"]["completion_tokens"] == 3
            assert_nothing_restarted(rt)


async def test_a_bug_in_one_request_ends_the_connections_other_streams_with_an_error(
        model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let it crash, but loudly: a bug (not bad input) crashes its connection, and the
    streams it carried end with a typed, retryable stream.error before it closes."""
    with trio.fail_after(30):
        async with serve(model_path) as (rt, listener):
            doomed = await Client.connect(listener)
            running = await doomed.result("generate", {"prompt": PROMPT, "max_tokens": LONG})
            await doomed.first_chunk(running["stream_id"])

            def bug() -> None:
                raise ValueError("a bug, not bad input")

            monkeypatch.setattr(rt, "health", bug)
            assert error_code(await doomed.call("health")) is Code.INTERNAL_ERROR
            monkeypatch.undo()
            _, end = await doomed.stream_end(running["stream_id"])
            assert end["method"] == "stream.error", end
            error = end["params"]["error"]
            assert error["data"]["code"] == Code.TRANSPORT_ERROR.value
            assert error["data"]["retryable"] is True
            assert "connection failed" in error["message"]
            while await doomed.line() is not None:  # then the connection closes
                pass
            again = await Client.connect(listener)
            assert (await again.result("health"))["ok"]


# -- the fuzz ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A method or endpoint, params that it accepts, and the fields to make extreme.

    `strings_act`: fields where a string of any length would be acted on (a model path
    would be loaded), so only non-strings are sent there.
    """

    name: str
    http: bool
    base: dict[str, Any]
    fields: tuple[str, ...]
    strings_act: frozenset[str] = frozenset()


_GENERATE = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k",
             "min_p", "repetition_penalty", "seed", "stop", "stop_token_ids", "logprobs",
             "top_logprobs", "n", "timeout_ms", "request_id", "client")
TARGETS = [
    *(Target(method, False, {}, ("verbose",))
      for method in ("runtime/info", "runtime/state", "health", "list_models", "shutdown")),
    Target("load_model", False, {"path": "/nonexistent", "alias": "x"},
           ("path", "alias", "fallbacks"), frozenset({"path"})),
    Target("unload_model", False, {"alias": "nobody"}, ("alias",)),
    Target("tokenize", False, {"model": "tiny", "text": "hi"},
           ("model", "text", "add_special_tokens")),
    Target("detokenize", False, {"model": "tiny", "token_ids": [1]}, ("model", "token_ids")),
    Target("cancel", False, {"stream_id": 1}, ("stream_id",)),
    Target("generate", False, {"prompt": "hi", "max_tokens": 2}, _GENERATE),
    Target("complete", False, {"prompt": "hi", "max_tokens": 2}, _GENERATE),
    Target("/v1/completions", True, {"model": "tiny", "prompt": "hi", "max_tokens": 2},
           ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
            "repetition_penalty", "seed", "stop", "stop_token_ids", "timeout_ms", "n",
            "logprobs", "user", "presence_penalty", "stream", "logit_bias")),
    Target("/v1/chat/completions", True,
           {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 2},
           ("model", "messages", "max_completion_tokens", "max_tokens", "temperature",
            "top_k", "seed", "stop", "stop_token_ids", "top_logprobs", "stream_options")),
]


@dataclass(frozen=True)
class Extreme:
    """A JSON text fragment; `malformed` when it is not JSON at all (NaN, Infinity), so
    no field can be named; `string` when it is a JSON string."""

    text: str
    malformed: bool = False
    string: bool = False


def extremes() -> st.SearchStrategy[Extreme]:
    huge = (st.sampled_from([2**31, 2**32, 2**63, 2**64, 2**70, 10**30, -1, -(2**63) - 1])
            | st.integers(min_value=2**31, max_value=2**200)
            | st.integers(min_value=-(2**200), max_value=-1))
    ints = huge.map(lambda n: Extreme(str(n)))
    bad_floats = st.sampled_from([Extreme("NaN", True), Extreme("Infinity", True),
                                  Extreme("-Infinity", True), Extreme("1e999"),
                                  Extreme("-1e999"), Extreme("1e308"), Extreme("-1e308")])
    floats = st.floats(allow_nan=False, allow_infinity=False).map(lambda x: Extreme(repr(x)))
    strings = st.tuples(st.sampled_from(["x", "é", "中", " ", "\x00", '"', "\\", "\n"]),
                        st.integers(min_value=300, max_value=20_000)).map(
        lambda t: Extreme(json.dumps(t[0] * t[1]), string=True))
    depth = st.integers(min_value=2, max_value=600)
    nested = (depth.map(lambda d: Extreme("[" * d + "1" + "]" * d))
              | depth.map(lambda d: Extreme('{"a":' * d + "1" + "}" * d)))
    scalar = ints | bad_floats | floats | strings | nested
    in_list = scalar.map(lambda e: Extreme(f"[1, {e.text}]", e.malformed, False))
    return scalar | in_list


def cases() -> st.SearchStrategy[tuple[Target, str, Extreme]]:
    def for_target(target: Target) -> st.SearchStrategy[tuple[Target, str, Extreme]]:
        return st.sampled_from(target.fields).flatmap(
            lambda name: st.tuples(st.just(target), st.just(name), extremes().filter(
                lambda e: not (e.string and name in target.strings_act))))

    return st.sampled_from(TARGETS).flatmap(for_target)


def params_text(target: Target, name: str, extreme: Extreme) -> str:
    """The params (or body) as JSON text, with `name` set to the extreme fragment."""
    base = {key: value for key, value in target.base.items() if key != name}
    if name == "messages":
        base.pop("prompt", None)  # exactly one of prompt and messages
    members = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in base.items()]
    return "{" + ", ".join([*members, f"{json.dumps(name)}: {extreme.text}"]) + "}"


def names_the_field(reported: Any, name: str) -> bool:
    return isinstance(reported, str) and (
        reported == name or reported.startswith((f"{name}[", f"{name}.")))


def check_rpc_reply(message: dict[str, Any], name: str, extreme: Extreme) -> None:
    """A reply to the extreme request: a result, or a client error naming the field."""
    if "result" in message:
        return
    code = error_code(message)
    assert code not in SERVER_FAULTS, message
    reported = message["error"]["data"].get("field")
    if code is Code.INVALID_PARAMS:
        assert names_the_field(reported, name), message
    elif code is Code.PARSE_ERROR and not extreme.malformed and reported is not None:
        assert names_the_field(reported.removeprefix("params."), name), message


def check_notification(message: dict[str, Any]) -> None:
    if message.get("method") == "stream.error":
        code = Code(message["params"]["error"]["data"]["code"])
        assert code not in SERVER_FAULTS, message


async def test_extreme_values_get_client_errors_naming_the_field(model_path: str) -> None:
    """Hypothesis picks a method or endpoint, one of its fields and an extreme value;
    the reply is a result or a client error naming that field, and the next request
    on the same connection (a JSON-RPC `health`, an HTTP completion) is served."""
    with trio.fail_after(50):
        async with serve(model_path) as (rt, listener), serving_http(rt) as http:
            rpc = await Client.connect(listener)
            connection = await HttpConnection.open(http.port)
            probes = itertools.count()
            seen: set[str] = set()
            ran: list[str] = []

            replies_for: dict[str, tuple[str, Extreme]] = {}  # asked, not answered yet

            async def over_jsonrpc(target: Target, name: str, extreme: Extreme) -> None:
                number = next(probes)
                probe, asked = f"probe-{number}", f"x-{number}"
                replies_for[asked] = (name, extreme)
                method, params = json.dumps(target.name), params_text(target, name, extreme)
                await rpc.send(f'{{"jsonrpc": "2.0", "id": "{asked}", "method": {method}, '
                               f'"params": {params}}}\n'.encode())
                await rpc.request("health", id=probe)
                # Requests run concurrently, so the probe may be answered first; a reply
                # that comes after it is checked by id in a later example's loop.
                while True:
                    message = await rpc.message()
                    if isinstance(message, dict) and "id" not in message:
                        check_notification(message)
                    elif message.get("id") == probe:
                        assert message["result"]["ok"], message
                        return
                    elif message.get("id") is None and extreme.malformed:
                        assert error_code(message) is Code.PARSE_ERROR, message
                    elif message.get("id") in replies_for:  # this example's, or a late one
                        check_rpc_reply(message, *replies_for.pop(message["id"]))

            async def over_http(target: Target, name: str, extreme: Extreme) -> None:
                reply = await connection.request(
                    "POST", target.name, params_text(target, name, extreme).encode())
                assert reply.status < 500, (reply.status, reply.body)
                if reply.status != 200:
                    error = reply.error
                    assert Code(error["code"]) not in SERVER_FAULTS, error
                    if error["code"] == Code.INVALID_PARAMS.value or (
                            error["code"] == Code.PARSE_ERROR.value and not extreme.malformed
                            and error["param"] is not None):
                        assert names_the_field(error["param"], name), error
                probe = await connection.request("POST", "/v1/completions", json.dumps(
                    {"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode())
                assert probe.status == 200, probe.body

            async def one(target: Target, name: str, extreme: Extreme) -> None:
                seen.add(target.name)
                ran.append(extreme.text[:20])
                with trio.fail_after(10):
                    if target.http:
                        await over_http(target, name, extreme)
                    else:
                        await over_jsonrpc(target, name, extreme)

            @settings(max_examples=150, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(cases())
            def examples(case: tuple[Target, str, Extreme]) -> None:
                trio.from_thread.run(one, *case)

            await trio.to_thread.run_sync(examples)
            assert len(ran) > 100 and len(seen) >= len(TARGETS) // 2  # hypothesis did run
            assert (await rpc.result("health"))["ok"]
            assert [m.alias for m in rt.list_models()] == ["tiny"]
            assert_nothing_restarted(rt)
