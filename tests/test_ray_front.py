"""The pieces of corral on Ray that need no Ray cluster: the guard in Serve's proxy
(driven by a fake proxy app whose ingress dies), the replica's relay that batches parts
into Ray items, and the merged /metrics of several replicas."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import msgspec
import pytest
import trio

pytest.importorskip("ray")

from corral.ray.exchange import Coalescing, Relay
from corral.ray.front import StreamGuard
from corral.ray.messages import DELIVERY_KEY, RESUME_HEADER, Delivery, ReplyPart, ResumeState
from corral.ray.view import merge_metrics

SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
Message = dict[str, Any]


def _body(data: bytes, tokens: list[int], prompt: list[int] | None = None) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True,
            DELIVERY_KEY: Delivery(tokens=tokens, prompt=prompt, resumable=True)}


async def _through_guard(app: Any, attempts: int = 3) -> list[Message]:
    """One POST through the guard; what the client was sent."""
    sent: list[Message] = []
    given = [{"type": "http.request", "body": b'{"x": 1}', "more_body": False}]

    async def receive() -> Message:
        if given:
            return given.pop()
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json")]}
    await StreamGuard(app, attempts=attempts)(scope, receive, send)
    return sent


def _text(sent: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_a_stream_whose_ingress_is_lost_continues_through_another() -> None:
    seen: list[dict[bytes, bytes]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["body"] == b'{"x": 1}'
        headers = dict(scope["headers"])
        seen.append(headers)
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        if len(seen) == 1:  # an ingress lost before a byte: sent again
            return
        if len(seen) == 2:
            await send(_body(b"data: a\n\n", [1, 2], prompt=[9]))
            return  # lost mid-stream
        state = msgspec.msgpack.decode(base64.b64decode(headers[RESUME_HEADER]),
                                       type=ResumeState)
        assert state == ResumeState(prompt=[9], delivered=[1, 2])
        await send(_body(b"data: b\n\n", [3]))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sent = await _through_guard(app)
    assert len(seen) == 3
    assert len({h[b"x-request-id"] for h in seen}) == 1  # one id for every attempt
    assert [m["type"] for m in sent].count("http.response.start") == 1
    assert _text(sent) == b"data: a\n\ndata: b\n\n"
    assert not any(DELIVERY_KEY in m for m in sent)
    assert sent[-1]["more_body"] is False


async def test_a_stream_that_cannot_continue_ends_with_a_typed_event() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        await send({"type": "http.response.body", "body": b"data: a\n\n", "more_body": True})

    sent = await _through_guard(app)
    event = _text(sent).split(b"\n\n")[1]
    error = json.loads(event.removeprefix(b"data: "))["error"]
    assert error["code"] == "TransportError" and error["retryable"] is True
    assert sent[-1]["more_body"] is False


async def test_a_continuation_refused_by_the_next_ingress_is_the_last_event() -> None:
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await receive()
        if calls == 1:
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            await send(_body(b"data: a\n\n", [1], prompt=[9]))
            return
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": {"code": "x"}}',
                    "more_body": False})

    sent = await _through_guard(app)
    assert _text(sent) == b'data: a\n\ndata: {"error": {"code": "x"}}\n\n'
    assert [m["type"] for m in sent].count("http.response.start") == 1


async def test_every_ingress_lost_before_replying_is_a_retryable_502() -> None:
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await receive()

    sent = await _through_guard(app, attempts=2)
    assert calls == 2
    assert sent[0]["status"] == 502
    assert json.loads(_text(sent))["error"]["retryable"] is True


def test_the_relay_batches_parts_and_holds_at_most_one() -> None:
    async def main() -> list[ReplyPart]:
        relay = Relay(Coalescing(interval_ms=50.0, max_tokens=4))
        got: list[ReplyPart] = []

        async def read() -> None:
            got.extend([part async for part in relay.parts()])

        reader = asyncio.ensure_future(read())
        relay.push(ReplyPart(kind="start", replica="r", status=200))
        await asyncio.sleep(0)  # the first part goes at once
        for token in range(6):
            relay.push(ReplyPart(kind="body", replica="r", body=b"x", tokens=[token]))
        relay.close()
        await reader
        return got

    got = asyncio.run(main())
    assert got[0].kind == "start"
    assert [t for part in got for t in part.tokens] == list(range(6))
    assert b"".join(part.body for part in got) == b"x" * 6
    assert len(got) == 2  # the six tokens waited together: one part


def test_metrics_of_several_replicas_are_labelled_by_replica() -> None:
    text = (b"# HELP corral_requests_total Requests.\n# TYPE corral_requests_total counter\n"
            b'corral_requests_total{outcome="success",code=""} 3.0\n'
            b"# HELP up Up.\n# TYPE up gauge\nup 1.0\n")
    merged = merge_metrics({"a": text, "b": text.replace(b"3.0", b"5.0")}).decode()
    assert merged.count("# TYPE corral_requests_total counter") == 1
    assert 'corral_requests_total{replica="a",outcome="success",code=""} 3.0' in merged
    assert 'corral_requests_total{replica="b",outcome="success",code=""} 5.0' in merged
    assert 'up{replica="b"} 1.0' in merged
    lines = merged.splitlines()
    assert lines.index('up{replica="a"} 1.0') > lines.index("# TYPE up gauge")
