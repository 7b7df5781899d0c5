"""The exchange of one generation request over HTTP, whatever its API: `ExchangeEndpoint`,
the ASGI app each generation endpoint subclasses with its `job` and `answer`, and
`Exchange`, its sending side (a whole JSON reply, or a stream framed as SSE, with
named events or not, or as NDJSON; an error as a status or as the stream's last event,
in the API's `ErrorShape`).

The endpoint owns the whole exchange: a client that goes away cancels its generation,
streaming or not; a server that stops tells the client why within `LAST_WORDS_S`; an
address holds at most so many generation requests at once (`ClientStreams`). Each
API's endpoints live beside their shapes (`openai_routes.py`, `anthropic_routes.py`,
`ollama_routes.py`, `responses.py`); this module never shapes a body of its own and
never calls the runtime.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Callable
from typing import Any, ClassVar, Final, Generic, TypeVar, final

import msgspec
import structlog
import trio
from starlette.requests import ClientDisconnect, Request
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
from corral.protocol.messages import Completion, GenerateParams
from corral.runtime import ChoiceStreams, Runtime
from corral.server.bodies import read_json
from corral.server.errors import (
    ErrorShape,
    error_headers,
    internal_error,
    status_of,
    with_drain_wait,
)
from corral.server.openai import OPENAI_ERRORS

__all__ = ["LAST_WORDS_S", "NDJSON", "SSE", "ClientStreams", "Exchange", "ExchangeEndpoint",
           "Framing", "StreamFailure", "client_address", "fallback_headers"]

_log = structlog.get_logger("corral.http")

LAST_WORDS_S: Final = 1.0
"""How long a server that is stopping, or refusing a connection, spends telling the
client why."""
_encode = msgspec.json.Encoder().encode
_J = TypeVar("_J")

StreamFailure = Callable[[CorralError], tuple[msgspec.Struct, str | None]]
"""The last event of a stream that failed, and its SSE event name, when the API's
`ErrorShape` cannot make it alone (Responses' `response.failed` names its response)."""


class Framing(msgspec.Struct, frozen=True):
    """How a streamed reply is framed.

    Attributes:
        headers: the stream's response headers.
        sse: events are server-sent events (`event:` when named, then `data:`); else
            one JSON object a line, names dropped.
        done: the bytes that end a stream that ended well, when its API asks for them.
    """

    headers: list[tuple[bytes, bytes]]
    sse: bool
    done: bytes

    def frame(self, data: bytes, name: str | None) -> bytes:
        """One event's bytes: `data` (JSON), named `name` where the framing names."""
        if not self.sse:
            return data + b"\n"
        head = b"event: " + name.encode() + b"\n" if name else b""
        return head + b"data: " + data + b"\n\n"


_NO_BUFFERING: Final = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
SSE: Final = Framing([(b"content-type", b"text/event-stream; charset=utf-8"), *_NO_BUFFERING],
                     sse=True, done=b"data: [DONE]\n\n")
"""Server-sent events, as the OpenAI and Anthropic APIs stream."""
NDJSON: Final = Framing([(b"content-type", b"application/x-ndjson"), *_NO_BUFFERING],
                        sse=False, done=b"")
"""One JSON object a line, as Ollama streams."""


@final
class Exchange:
    """The sending side of one generation request; reports how it ended to metrics,
    once.

    Until something is sent, an error can still be an HTTP status; after the stream's
    headers it can only be the stream's last event: `errors`' body, or what
    `stream_failure` (set by an API whose streams end otherwise) makes.

    Attributes:
        started_at: when the request arrived, on trio's clock.
        streaming: whether the stream's headers went out.
        disconnected: whether the client went away before the outcome was settled.
        stream: the generation, once opened (for metrics).
    """

    def __init__(self, send: Send, request_id: str, metrics: Metrics, started_at: float,
                 drain_ms: int, *, errors: ErrorShape, framing: Framing) -> None:
        self._send = send
        self._metrics = metrics
        self._drain_ms = drain_ms
        self._errors = errors
        self._framing = framing
        self._observed = False
        self.request_id = request_id
        self.started_at = started_at
        self.streaming = False
        self.disconnected = False
        self.stream: ChoiceStreams | None = None
        self.stream_failure: StreamFailure | None = None

    @property
    def ended(self) -> bool:
        """Whether the request's outcome is settled (a reply, or an error reported)."""
        return self._observed

    def _observe(self, outcome: RequestOutcome, code: str | None) -> None:
        # Before the last bytes go out, so a client that has its reply sees it counted.
        if not self._observed:
            self._observed = True
            self._metrics.observe_stream(self.stream, self.started_at, outcome, code)

    def succeeded(self) -> None:
        self._observe("success", None)

    def failed(self, error: CorralError) -> None:
        self._observe("error", error.code.value)

    def abandoned(self) -> None:
        """The request ended without a reply of its own: the client went away."""
        self._observe("cancelled", Code.CANCELLED.value)

    async def start_stream(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Send the streamed reply's status and headers (the framing's, then `headers`)."""
        self.streaming = True
        await self._send({"type": "http.response.start", "status": 200,
                          "headers": [*self._framing.headers, *(headers or [])]})

    async def event(self, data: msgspec.Struct, name: str | None = None) -> None:
        """One event of the stream: `data`, named `name` (SSE's `event:`) when given."""
        await self._send({"type": "http.response.body", "more_body": True,
                          "body": self._framing.frame(_encode(data), name)})

    async def end_stream(self, *, done: bool) -> None:
        """End the stream; `done`: with the framing's end mark (`data: [DONE]`)."""
        await self._send({"type": "http.response.body", "more_body": False,
                          "body": self._framing.done if done else b""})

    async def json(self, status: int, data: msgspec.Struct,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """The whole reply: `data` as JSON."""
        body = _encode(data)
        await self._send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def reply(self, data: msgspec.Struct,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """The whole reply of a request that succeeded: counted, then sent (200)."""
        self.succeeded()
        await self.json(200, data, headers)

    async def fail(self, error: CorralError) -> None:
        """Report `error` the only way still open: a status, or the stream's last event."""
        error = with_drain_wait(error, self._drain_ms)
        self.failed(error)
        if not self.streaming:
            await self.json(status_of(error), self._errors.body(error, self.request_id),
                            error_headers(error))
            return
        if self.stream_failure is not None:
            await self.event(*self.stream_failure(error))
        else:
            await self.event(self._errors.body(error, self.request_id),
                             self._errors.sse_event)
        await self.end_stream(done=False)


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


def fallback_headers(stream: ChoiceStreams) -> list[tuple[bytes, bytes]]:
    """`X-Corral-Fallback: <what served it>` when a fallback served the request."""
    if stream.fallback is None:
        return []
    return [(b"x-corral-fallback", stream.fallback.encode())]


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
    becomes a job (`job`) and how a job is answered (`answer`), and sets its API's
    `errors` and `framing`.

    It owns the whole exchange, so that a disconnect cancels the generation whatever
    it is doing: waiting for admission, for tokens, or for the client to read. Errors
    before the first event get their HTTP status (the stream's headers wait for it).
    The client's address is the `client` of its streams for the registry's fair
    admission. Cancelled (the server stops), a reply cut short ends with a
    TransportError the client is told within `LAST_WORDS_S`.

    Args:
        method: names the request in a Timeout ("chat.completions").
        body_timeout_ms: a request's whole body must arrive within this.
        clients: the per-address count every generation endpoint shares.
    """

    errors: ClassVar[ErrorShape] = OPENAI_ERRORS
    """How the API tells an error."""
    framing: ClassVar[Framing] = SSE
    """How the API frames a streamed reply."""

    def __init__(self, runtime: Runtime, metrics: Metrics, method: str, *,
                 body_timeout_ms: int, clients: ClientStreams) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._method = method
        self._max_body = runtime.config.server.max_body_bytes
        self._drain_ms = runtime.config.server.drain_timeout_ms
        self._body_timeout_ms = body_timeout_ms
        self._clients = clients

    @abc.abstractmethod
    def job(self, body: Any, request_id: str, client: str) -> _J:
        """A request body (builtins) as a job for `answer`: validated, typed once.

        Raises:
            CorralError: what the client is answered with, as its HTTP status.
        """

    @abc.abstractmethod
    async def answer(self, job: _J, exchange: Exchange) -> None:
        """Run `job` and send its reply through `exchange`, whole or streamed.

        A whole reply is `complete` then `exchange.reply`. A stream opens the
        generation with `runtime.choices`, sets `exchange.stream`, and calls
        `exchange.succeeded()` before the last bytes go out.

        Raises:
            Exception: whatever ended the generation; the endpoint tells the client.
        """

    async def complete(self, params: GenerateParams | list[GenerateParams], exchange: Exchange
                       ) -> tuple[Completion, list[tuple[bytes, bytes]]]:
        """Run `params` (or a batch of prompts, `Runtime.choices`) to its end for a
        whole reply: the completion, and the headers its reply carries
        (`fallback_headers`). The generation is closed before this returns, so its
        stream slot is free when the client has the reply."""
        async with self._runtime.choices(params) as choices:
            exchange.stream = choices
            completion = await choices.completion()
        return completion, fallback_headers(choices)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        client = client_address(scope)
        exchange = Exchange(send, request_id, self._metrics, trio.current_time(),
                            self._drain_ms, errors=self.errors, framing=self.framing)
        try:
            body = await read_json(Request(scope, receive), self._max_body,
                                    self._body_timeout_ms)
            job = self.job(body, request_id, f"http:{client}")
            self._clients.take(client)
        except ClientDisconnect:
            exchange.abandoned()
            return
        except CorralError as exc:
            await exchange.fail(exc)
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

    async def _run(self, job: _J, exchange: Exchange) -> None:
        try:
            await self.answer(job, exchange)
        except Exception as exc:  # the client gets every failure as a reply
            await exchange.fail(self._failure(exc, exchange.request_id))

    def _failure(self, exc: Exception, request_id: str) -> CorralError:
        """What a client is told of `exc`: a corral error as it is (a Timeout naming
        the method), anything else as an InternalError that names only its type (and
        is logged whole: it is a bug)."""
        error = innermost(exc)
        if isinstance(error, TimeoutError):
            return error.for_method(self._method)
        if not isinstance(error, CorralError):
            _log.error("http.generation_failed", request_id=request_id, exc_info=error)
            return internal_error(error)
        return error
