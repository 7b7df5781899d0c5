"""The HTTP API's endpoints as ASGI apps: `ExchangeEndpoint`, the exchange of one
generation request that every generation API builds on (`completions.py`,
`responses.py`), and GET /v1/models[/{id}], /health and /metrics.

A generation endpoint owns its whole exchange, so that a client that goes away cancels
its generation, streaming or not, and an error after a stream has started is its last
SSE event, never a dropped connection. Endpoints speak to the runtime facade only: this
module never reaches into actors, holds no state a restart of the HTTP server would
lose (per-client counts aside, which end with their requests), and leaves the shapes
of bodies and the status of errors to `openai.py`.
"""

from __future__ import annotations

import abc
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar, final

import msgspec
import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from corral.metrics import Metrics, RequestOutcome
from corral.protocol.errors import (
    Code,
    CorralError,
    EngineClientError,
    OverloadedError,
    TimeoutError,
)
from corral.protocol.jsonrpc import decode_json
from corral.protocol.messages import innermost
from corral.protocol.openai import ModelCard, ModelList
from corral.runtime import ChoiceStreams, ModelDescription, Runtime
from corral.server.openai import (
    drain_wait_ms,
    error_body,
    error_headers,
    explained,
    internal_error,
    retry_after,
    status_of,
    with_drain_wait,
)

__all__ = ["LAST_WORDS_S", "ClientStreams", "Exchange", "ExchangeEndpoint", "Routes",
           "error_response", "fallback_headers", "json_response", "model_card", "read_body",
           "read_json"]

LAST_WORDS_S: Final = 1.0
"""How long a server that is stopping, or refusing a connection, spends telling the
client why."""
_SSE_HEADERS: Final = [(b"content-type", b"text/event-stream; charset=utf-8"),
                       (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_encode = msgspec.json.Encoder().encode
_J = TypeVar("_J")

_log = structlog.get_logger("corral.http")


def error_response(error: CorralError, request_id: str) -> Response:
    """`error` as a whole response: its status, OpenAI's error body, its headers."""
    response = Response(_encode(error_body(error, request_id)), status_of(error),
                        media_type="application/json")
    response.raw_headers.extend(error_headers(error))
    return response


def json_response(data: Any, status: int = 200) -> Response:
    """`data` (a Struct or builtins) as a JSON response."""
    return Response(_encode(data), status, media_type="application/json")


async def read_json(request: Request, limit: int, timeout_ms: int) -> Any:
    """The request body as builtins, read within `timeout_ms`; one whose Content-Length
    is over `limit` is refused before any of it is read.

    Raises:
        EngineClientError: InvalidRequest for a body over `limit` bytes (sent as 413,
            `details["max_body_bytes"]`), ParseError for one that is not JSON, Timeout
            (`details["body_timeout_ms"]`, sent as 408) for one that did not arrive in
            time.
        ClientDisconnect: the client went away while sending it.
    """
    return decode_json(await read_body(request, limit, timeout_ms))


async def read_body(request: Request, limit: int, timeout_ms: int) -> bytes:
    """The request body, read as `read_json` says (which see), not decoded."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, f"{int(declared):,} bytes declared")
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout_ms / 1000.0) as reading:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _too_large(limit, f"over {limit:,} bytes sent")
            parts.append(part)
    if reading.cancelled_caught:
        raise EngineClientError(
            Code.TIMEOUT, f"body: {size} bytes arrived in {timeout_ms / 1000.0:g}s, not all",
            {"body_timeout_ms": timeout_ms})
    return b"".join(parts)


def _too_large(limit: int, seen: str) -> EngineClientError:
    return EngineClientError(
        Code.INVALID_REQUEST,
        f"body: larger than the {limit:,} bytes this server accepts ({seen}; "
        "server.max_body_bytes)", {"max_body_bytes": limit})


# -- the exchange of one generation request -----------------------------------------------


@final
class Exchange:
    """The sending side of one generation request; reports how it ended to metrics,
    once.

    Until something is sent, an error can still be an HTTP status; after the SSE
    headers it can only be the stream's last event: OpenAI's error body, unless
    `sse_failure` (set by an API whose streams end otherwise) sends it.
    """

    def __init__(self, send: Send, request_id: str, metrics: Metrics,
                 started_at: float, drain_ms: int) -> None:
        self._send = send
        self._metrics = metrics
        self._started_at = started_at
        self._drain_ms = drain_ms
        self._observed = False
        self.request_id = request_id
        self.sse_started = False
        self.disconnected = False
        self.stream: ChoiceStreams | None = None
        self.sse_failure: Callable[[CorralError], Awaitable[None]] | None = None

    @property
    def ended(self) -> bool:
        """Whether the request's outcome is settled (a reply, or an error reported)."""
        return self._observed

    def _observe(self, outcome: RequestOutcome, code: str | None) -> None:
        # Before the last bytes go out, so a client that has its reply sees it counted.
        if not self._observed:
            self._observed = True
            self._metrics.observe_stream(self.stream, self._started_at, outcome, code)

    def succeeded(self) -> None:
        self._observe("success", None)

    def failed(self, error: CorralError) -> None:
        self._observe("error", error.code.value)

    def abandoned(self) -> None:
        """The request ended without a reply of its own: the client went away."""
        self._observe("cancelled", Code.CANCELLED.value)

    async def start_sse(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.sse_started = True
        await self._send({"type": "http.response.start", "status": 200,
                          "headers": [*_SSE_HEADERS, *(headers or [])]})

    async def event(self, data: msgspec.Struct, name: str | None = None) -> None:
        """One SSE event; `name`, its `event:` field (none by default)."""
        head = b"" if name is None else b"event: " + name.encode() + b"\n"
        await self._send({"type": "http.response.body", "more_body": True,
                          "body": head + b"data: " + _encode(data) + b"\n\n"})

    async def end_sse(self, *, done: bool) -> None:
        await self._send({"type": "http.response.body", "more_body": False,
                          "body": b"data: [DONE]\n\n" if done else b""})

    async def json(self, status: int, data: msgspec.Struct,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = _encode(data)
        await self._send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def fail(self, error: CorralError) -> None:
        """Report `error` the only way still open: a status, or the last SSE event."""
        error = with_drain_wait(error, self._drain_ms)
        self.failed(error)
        if self.sse_started:
            if self.sse_failure is not None:
                await self.sse_failure(error)
            else:
                await self.event(error_body(error, self.request_id))
            await self.end_sse(done=False)
        else:
            await self.json(status_of(error), error_body(error, self.request_id),
                            error_headers(error))


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope,
                                exchange: Exchange) -> None:
    """Cancel `scope` when the client goes away (the body was read already, so the next
    ASGI message is the disconnect).

    Once the outcome is settled, the disconnect is hypercorn ending the exchange as the
    last bytes go out, and nothing is cancelled: hypercorn starts the connection's
    keep-alive timer from inside that last send, and a cancel then would kill the timer,
    leaving an idle connection open for good.
    """
    while (await receive())["type"] != "http.disconnect":
        pass
    if exchange.ended:
        return
    exchange.disconnected = True
    scope.cancel()


async def _last_words(exchange: Exchange) -> None:
    """Tell a client whose reply the stopping server cuts short, rather than drop it.

    Runs shielded for at most `LAST_WORDS_S`: the server is being cancelled.
    """
    with trio.CancelScope(shield=True, deadline=trio.current_time() + LAST_WORDS_S):
        try:
            await exchange.fail(EngineClientError(
                Code.TRANSPORT_ERROR, "the HTTP server stopped before the reply was complete",
                retryable=True))
        except Exception as exc:  # the connection may be gone already
            _log.info("http.last_words_undelivered", request_id=exchange.request_id,
                      error=repr(exc))


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@final
class ClientStreams:
    """Generation requests open per client address, shared by every generation endpoint.

    Args:
        limit: requests one address may have open at once; None: no limit.
        retry_after_ms: the wait an Overloaded answer tells.
    """

    def __init__(self, limit: int | None, retry_after_ms: int) -> None:
        self._limit = limit
        self._retry_after_ms = retry_after_ms
        self._open: collections.Counter[str] = collections.Counter()

    def take(self, client: str) -> None:
        """Count one more request of `client`; `give_back` it when it ends.

        Raises:
            OverloadedError: `client` has as many open as allowed.
        """
        if self._limit is not None and self._open[client] >= self._limit:
            raise OverloadedError(
                f"client {client} has {self._open[client]} generation requests open, "
                "the most allowed", self._retry_after_ms,
                {"max_streams_per_client": self._limit})
        self._open[client] += 1

    def give_back(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]


class ExchangeEndpoint(abc.ABC, Generic[_J]):
    """A POST endpoint that generates, as a plain ASGI app; a subclass says how a body
    becomes a job (`job`) and how a job is answered (`answer`).

    It owns the whole exchange, so that a disconnect cancels the generation whatever
    it is doing: waiting for admission, for tokens, or for the client to read. Errors
    before the first token get their HTTP status (the SSE headers wait for it). The
    client's address is the `client` of its streams for the registry's fair admission.
    Cancelled (the server stops), a reply cut short ends with a TransportError the
    client is told within `LAST_WORDS_S`.

    Args:
        method: names the request in a Timeout.
        body_timeout_ms: a request's whole body must arrive within this.
        clients: the per-address count every generation endpoint shares.
    """

    def __init__(self, runtime: Runtime, metrics: Metrics, method: str, *,
                 body_timeout_ms: int, clients: ClientStreams) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._method = method
        self._max_body = runtime.config.server.max_body_bytes
        self._drain_ms = runtime.config.server.drain_timeout_ms
        self._body_timeout_ms = body_timeout_ms
        self._clients = clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        client = _client_address(scope)
        exchange = Exchange(send, request_id, self._metrics, trio.current_time(),
                            self._drain_ms)
        try:
            body = await read_json(Request(scope, receive), self._max_body,
                                    self._body_timeout_ms)
            job = self.job(body, request_id, f"http:{client}")
            self._clients.take(client)
        except ClientDisconnect:
            exchange.abandoned()
            return
        except CorralError as exc:
            await exchange.fail(explained(exc))
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope,
                                   exchange)
                try:
                    await self._run(job, exchange)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._clients.give_back(client)
            if not exchange.ended and not exchange.disconnected:
                await _last_words(exchange)
            exchange.abandoned()

    @abc.abstractmethod
    def job(self, body: Any, request_id: str, client: str) -> _J:
        """A request body (builtins) as a job for `answer`.

        Raises:
            CorralError: what the client is answered with, as its HTTP status.
        """

    @abc.abstractmethod
    async def answer(self, job: _J, exchange: Exchange) -> None:
        """Run `job` and send its reply; an exception raised is the client's error."""

    async def _run(self, job: _J, exchange: Exchange) -> None:
        try:
            await self.answer(job, exchange)
        except Exception as exc:  # the client gets every failure as a reply
            error = innermost(exc)
            if isinstance(error, TimeoutError):
                error = error.for_method(self._method)
            elif not isinstance(error, CorralError):
                _log.error("http.generation_failed", request_id=exchange.request_id,
                           exc_info=error)
                error = internal_error(error)
            await exchange.fail(explained(error))


def fallback_headers(stream: ChoiceStreams) -> list[tuple[bytes, bytes]]:
    """`X-Corral-Fallback: <what served it>` when a fallback served the request."""
    if stream.fallback is None:
        return []
    return [(b"x-corral-fallback", stream.fallback.encode())]


# -- the small routes -----------------------------------------------------------------


def model_card(model: ModelDescription, created: int) -> ModelCard:
    """A model as GET /v1/models lists it."""
    return ModelCard(id=model.alias, created=created, root=model.path,
                     max_model_len=model.info.max_context if model.info else None,
                     state=model.state, breaker=model.breaker)


@final
class Routes:
    """GET /v1/models, /v1/models/{id}, /health and /metrics."""

    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._created = int(time.time())

    def _cards(self) -> list[ModelCard]:
        return [model_card(m, self._created) for m in self._runtime.list_models()]

    async def models(self, request: Request) -> Response:
        return json_response(ModelList(self._cards()))

    async def model(self, request: Request) -> Response:
        """The model's card, or 404 (ModelNotLoaded)."""
        alias = request.path_params["model"]
        for card in self._cards():
            if card.id == alias:
                return json_response(card)
        return error_response(
            EngineClientError(Code.MODEL_NOT_LOADED, f"model {alias!r} is not loaded",
                              {"model": alias}), request.state.request_id)

    async def health(self, request: Request) -> Response:
        """200, or 503 with the reasons; while draining, with the drain's Retry-After."""
        health = self._runtime.health()
        body = {"status": "ok" if health.ok else "unavailable", **msgspec.to_builtins(health)}
        response = json_response(body, 200 if health.ok else 503)
        if not health.ok and self._runtime.draining:
            response.raw_headers.append(
                retry_after(drain_wait_ms(self._runtime.config.server.drain_timeout_ms)))
        return response

    async def metrics(self, request: Request) -> Response:
        return Response(await self._metrics.render(), media_type=CONTENT_TYPE_LATEST)
