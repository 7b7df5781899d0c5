"""The guard in Serve's HTTP proxy: what the client of a lost ingress gets.

Serve's proxy holds the client's connection and calls one ingress replica per request.
When that replica dies (killed, or stopped past its graceful timeout by a redeploy or a
scale-down), Serve's proxy ends the response where it is, and the client reads a cut
connection. The guard is an ASGI middleware that Serve runs in its proxy
(`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names `proxy_middlewares`; `corral.ray.deploy`
sets it), and makes that what corral promises:
- lost before any byte of the reply: the request again (its body kept), which Serve
  routes to another ingress, up to `attempts` calls in all;
- a deterministic SSE stream lost mid-way: continued through another ingress, which a
  `RESUME_HEADER` with the tokens the client has makes resume the stream on a replica
  (`generated=`), so the client reads one unbroken, fault-free text;
- any other stream: a retryable TransportError event, then the end of the body.

It takes out of each body message the `Delivery` the ingress puts beside it. It never
changes a byte the ingress sends, and guards only POST bodies up to `MAX_BODY_BYTES`
(a larger one passes through as Serve would have it).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

import msgspec
import structlog
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.protocol.errors import Code, EngineClientError
from corral.ray.ingress import lost_event, pinned_request_id
from corral.ray.messages import DELIVERY_KEY, RESUME_HEADER, Delivery, ResumeState
from corral.server.openai import error_body

__all__ = ["ATTEMPTS_ENV", "MAX_BODY_BYTES", "StreamGuard", "proxy_middlewares"]

ATTEMPTS_ENV: Final = "CORRAL_RAY_PROXY_ATTEMPTS"
"""Calls to ingress replicas one request may make (default 3; `corral.ray.deploy` sets
`calls.retry.max_attempts`)."""
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
_encode = msgspec.json.Encoder().encode
_encode_resume = msgspec.msgpack.Encoder().encode
_log = structlog.get_logger("corral.ray")


def proxy_middlewares() -> list[Middleware]:
    """What Serve's proxy calls at start (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    return [Middleware(StreamGuard, attempts=int(os.environ.get(ATTEMPTS_ENV, "3")))]


@final
class _Reply:
    """What one request's client was sent, across the ingresses that served it."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: Message | None = None
        self._refused = False  # a later ingress answered with an error, not a stream
        self.started = False  # a byte of the body reached the client
        self.complete = False
        self.finished = False  # the SSE stream's last choice event was sent
        self.event_stream = False
        self.client_gone = False
        self.prompt: list[int] | None = None
        self.delivered: list[int] = []
        self.resumable = False

    async def send(self, message: Message) -> None:
        """Serve's send: the start is held until the body's first byte (a later
        ingress's start is dropped, and an error body it starts becomes the stream's
        last event), the `Delivery` is taken out of each body."""
        if message["type"] == "http.response.start":
            if not self.started:
                self._held = message
            else:  # a later ingress's: its status says what its body is
                self._refused = message["status"] != 200
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        delivery = message.pop(DELIVERY_KEY, None)
        body: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self._refused and body:  # an error body, once the stream has begun: its event
            message = {**message, "body": b"data: " + body.strip() + b"\n\n"}
            body = message["body"]
        if self._held is not None and (body or not more):
            held, self._held = self._held, None
            self.event_stream = any(name.lower() == b"content-type" and
                                    value.startswith(b"text/event-stream")
                                    for name, value in held.get("headers", ()))
            await self._send(held)
        if not self.started and not body and more:
            return
        await self._send(message)
        self.started = True
        if isinstance(delivery, Delivery):
            self.delivered.extend(delivery.tokens)
            if delivery.prompt is not None:
                self.prompt = delivery.prompt
            self.resumable = self.resumable or delivery.resumable
        self.finished = self.finished or b'"finish_reason":"' in body
        self.complete = not more

    async def end(self, body: bytes) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def resume_header(self) -> tuple[bytes, bytes]:
        assert self.prompt is not None
        state = ResumeState(prompt=self.prompt, delivered=self.delivered)
        return RESUME_HEADER, base64.b64encode(_encode_resume(state))


@final
class StreamGuard:
    """The proxy's middleware (see the module's docstring).

    Args:
        app: Serve's proxy app.
        attempts: calls to ingress replicas one request may make.
    """

    def __init__(self, app: ASGIApp, attempts: int = 3) -> None:
        self._app = app
        self._attempts = max(1, attempts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = bool(message.get("more_body", False))
            if more and size > MAX_BODY_BYTES:
                await self._app(scope, _replay(chunks, True, receive, None), send)
                return
        await self._guarded(scope, b"".join(chunks), receive, send)

    async def _guarded(self, scope: Scope, body: bytes, receive: Receive,
                       send: Send) -> None:
        given = next((value.decode("latin-1") for name, value in scope["headers"]
                      if name == b"x-request-id"), None)
        request_id = pinned_request_id(given)
        headers = [(name, value) for name, value in scope["headers"]
                   if name not in (b"x-request-id", RESUME_HEADER)]
        headers.append((b"x-request-id", request_id.encode()))
        reply = _Reply(send)
        attempt_scope = {**scope, "headers": headers}
        for attempt in range(1, self._attempts + 1):
            try:
                await self._app(attempt_scope, _replay([body], False, receive, reply),
                                reply.send)
            except Exception as exc:  # Serve's app answers its own errors: this is a cut
                _log.warning("ray.proxy_call_failed", request_id=request_id,
                             error=type(exc).__name__)
            if reply.complete or reply.client_gone:
                return
            if attempt == self._attempts:
                break
            if not reply.started:
                _log.warning("ray.ingress_lost_before_reply", request_id=request_id,
                             attempt=attempt)
                continue
            if reply.finished or not (reply.event_stream and reply.resumable
                                      and reply.prompt is not None):
                break
            _log.warning("ray.ingress_lost_stream_resumed", request_id=request_id,
                         delivered=len(reply.delivered), attempt=attempt)
            attempt_scope = {**scope, "headers": [*headers, reply.resume_header()]}
        await self._give_up(reply, request_id)

    async def _give_up(self, reply: _Reply, request_id: str) -> None:
        """End a reply that no more attempts may finish, as `corral serve` would."""
        if not reply.started:
            error = EngineClientError(Code.TRANSPORT_ERROR, "the ingress replicas were "
                                      "lost before replying", retryable=True)
            await reply.send({"type": "http.response.start", "status": 502, "headers": [
                (b"content-type", b"application/json"),
                (b"x-request-id", request_id.encode())]})
            await reply.end(_encode(error_body(error, request_id)))
        elif reply.finished and reply.event_stream:
            await reply.end(b"data: [DONE]\n\n")
        elif reply.event_stream:
            await reply.end(lost_event(request_id, "the ingress", "ActorDiedError",
                                       len(reply.delivered)))
        # Else part of a whole (JSON) body was sent, which the replica sends in one piece:
        # the connection closes unfinished, so the client sees it is cut, not complete.


def _replay(chunks: list[bytes], more: bool, receive: Receive,
            reply: _Reply | None) -> Callable[[], Awaitable[Message]]:
    """A receive that gives the body read so far, then the client's own messages
    (noting in `reply` that the client left)."""
    pending = list(chunks)

    async def replayed() -> Message:
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body,
                    "more_body": bool(pending) or more}
        message: dict[str, Any] = dict(await receive())
        if message["type"] == "http.disconnect" and reply is not None:
            reply.client_gone = True
        return message

    return replayed
