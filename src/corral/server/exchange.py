"""The exchange of one generation request over HTTP, whatever its API: the sending
side (`Exchange`: a whole JSON reply, or a stream framed as SSE or NDJSON, and the
error as a status or as the stream's last event), cancellation when the client goes
away, last words when the server stops, and the count of streams per client address.

Shared by the OpenAI endpoints (`routes.py`) and the Ollama ones (`ollama_routes.py`);
it never shapes a body of its own (the error body is the caller's) and never calls the
runtime.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Final, final

import msgspec
import structlog
import trio
from starlette.types import Receive, Scope, Send

from corral.metrics import Metrics, RequestOutcome
from corral.protocol.errors import (
    Code,
    CorralError,
    EngineClientError,
    OverloadedError,
    TimeoutError,
)
from corral.protocol.lifecycle import innermost
from corral.runtime import ChoiceStreams
from corral.server.openai import (
    error_body,
    error_headers,
    internal_error,
    status_of,
    with_drain_wait,
)

__all__ = ["LAST_WORDS_S", "NDJSON", "SSE", "ClientStreams", "Exchange", "Framing",
           "client_address", "failure", "run_exchange"]

_log = structlog.get_logger("corral.http")

LAST_WORDS_S: Final = 1.0
"""How long a server that is stopping, or refusing a connection, spends telling the
client why."""
_encode = msgspec.json.Encoder().encode


class Framing(msgspec.Struct, frozen=True):
    """How a streamed reply is framed: its headers, the bytes around each event, and
    the bytes that end a stream that ended well."""

    headers: list[tuple[bytes, bytes]]
    before: bytes
    after: bytes
    done: bytes


SSE: Final = Framing([(b"content-type", b"text/event-stream; charset=utf-8"),
                      (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")],
                     b"data: ", b"\n\n", b"data: [DONE]\n\n")
"""Server-sent events, as OpenAI streams."""
NDJSON: Final = Framing([(b"content-type", b"application/x-ndjson"),
                         (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")],
                        b"", b"\n", b"")
"""One JSON object a line, as Ollama streams."""


@final
class Exchange:
    """The sending side of one generation request; reports how it ended to metrics,
    once.

    Until something is sent, an error can still be an HTTP status; after the stream's
    headers it can only be the stream's last event.

    Args:
        framing: how a streamed reply is framed (SSE by default).
        error_body: the body of an error, and the last event of a stream that failed
            (OpenAI's by default).
    """

    def __init__(self, send: Send, request_id: str, metrics: Metrics,
                 started_at: float, drain_ms: int, *, framing: Framing = SSE,
                 error_body: Callable[[CorralError, str], msgspec.Struct] = error_body
                 ) -> None:
        self._send = send
        self._metrics = metrics
        self._started_at = started_at
        self._drain_ms = drain_ms
        self._framing = framing
        self._error_body = error_body
        self._observed = False
        self.request_id = request_id
        self.sse_started = False
        self.disconnected = False
        self.stream: ChoiceStreams | None = None

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
        """Start the streamed reply (in the exchange's framing, SSE or not)."""
        self.sse_started = True
        await self._send({"type": "http.response.start", "status": 200,
                          "headers": [*self._framing.headers, *(headers or [])]})

    async def event(self, data: msgspec.Struct) -> None:
        framing = self._framing
        await self._send({"type": "http.response.body", "more_body": True,
                          "body": framing.before + _encode(data) + framing.after})

    async def end_sse(self, *, done: bool) -> None:
        await self._send({"type": "http.response.body", "more_body": False,
                          "body": self._framing.done if done else b""})

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
            await self.event(self._error_body(error, self.request_id))
            await self.end_sse(done=False)
        else:
            await self.json(status_of(error), self._error_body(error, self.request_id),
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


def client_address(scope: Scope) -> str:
    """The client's address, which names it for the per-address stream count and the
    registry's fair admission."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@final
class ClientStreams:
    """Generation requests open per client address, shared by both endpoints.

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


def failure(exc: Exception, method: str, request_id: str) -> CorralError:
    """What a client is told of `exc`, raised while its request was served: a corral
    error as it is (a Timeout naming `method`), anything else as an InternalError that
    names only its type (and is logged whole: it is a bug)."""
    error = innermost(exc)
    if isinstance(error, TimeoutError):
        return error.for_method(method)
    if not isinstance(error, CorralError):
        _log.error("http.generation_failed", request_id=request_id, exc_info=error)
        return internal_error(error)
    return error


async def run_exchange(exchange: Exchange, receive: Receive, clients: ClientStreams,
                       client: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run one generation request's `run`, which answers through `exchange`, with a
    stream of `client`'s counted in `clients` (or 429 when it has too many open).

    The client going away cancels `run` whatever it is doing; cancelled (the server
    stops) before the reply is complete, the client is told within `LAST_WORDS_S`.
    """
    try:
        clients.take(client)
    except CorralError as exc:
        await exchange.fail(exc)
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope,
                               exchange)
            try:
                await run()
            finally:
                nursery.cancel_scope.cancel()
    finally:
        clients.give_back(client)
        if not exchange.ended and not exchange.disconnected:
            await _last_words(exchange)
        exchange.abandoned()
