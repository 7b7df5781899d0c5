"""The HTTP transport: an OpenAI-compatible API, /health and /metrics, served by
Hypercorn's trio worker and Starlette.

Routes: POST /v1/completions and /v1/chat/completions (JSON, or SSE with `stream`),
GET /v1/models[/{id}], GET /health, GET /metrics. Every error leaves as OpenAI's error
body with corral's code name and the request id, its status from the error table; an
error after a stream has started is its last SSE event, never a dropped connection. A
client that goes away cancels its generation, streaming or not. This module speaks to
the runtime facade only; it never reaches into actors, and holds no state a restart
of the HTTP server would lose.

What one client can hold is bounded (`HttpLimits`): a request body has a deadline, a
connection with no request in progress closes after the keep-alive timeout, open
connections are capped, and so, optionally, are the generation requests of one client
address. Hypercorn's own `read_timeout` is not used: it bounds every read of a
connection, so it would also end an SSE reply whose client sends nothing while it
reads, which is what every SSE client does.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import re
import resource
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final, Literal, final

import msgspec
import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.actors.core import Context
from corral.actors.streams import StreamChunk
from corral.config import ServerConfig
from corral.logging import bind_request
from corral.metrics import Metrics, RequestOutcome
from corral.protocol.errors import Code, CorralError, EngineClientError, OverloadedError
from corral.protocol.jsonrpc import convert_params, decode_json
from corral.protocol.messages import FinishReason, Usage, innermost
from corral.protocol.openai import (
    NEUTRAL_ONLY,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    UsageInfo,
)
from corral.runtime import Runtime, TokenStream

__all__ = ["HttpLimits", "HttpServer", "build_app", "default_max_connections"]

_log = structlog.get_logger("corral.http")

_REQUEST_ID: Final = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII, as log-safe as ids go
_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
    429: "rate_limit_error", 499: "cancelled",
}
_SSE_HEADERS: Final = [(b"content-type", b"text/event-stream; charset=utf-8"),
                       (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_encode = msgspec.json.Encoder().encode
_LAST_WORDS_S: Final = 1.0
_RECEIVE_BYTES: Final = 65536
_MAX_CONNECTIONS_CEILING: Final = 4096


def default_max_connections() -> int:
    """Half the process's file-descriptor limit (the rest is for models, engine workers
    and JSON-RPC), between 16 and 4096: past the limit accept() fails, and with it
    every other file the process opens."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return _MAX_CONNECTIONS_CEILING
    return max(16, min(_MAX_CONNECTIONS_CEILING, soft // 2))


class HttpLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one client may hold of the HTTP server.

    Attributes:
        body_timeout_ms: a request's whole body must arrive within this after its
            headers; else the client gets 408 (code Timeout) and the connection closes.
        keep_alive_timeout_ms: a connection with no request in progress (new and
            silent, headers half sent, or idle between requests) closes after this.
        max_connections: connections open at once; one more is answered 429
            (Overloaded, with Retry-After) and closed. None: `default_max_connections()`.
        max_streams_per_client: generation requests one client address may have open
            at once; one more is 429 (Overloaded, with Retry-After). None: no limit, as
            clients behind one proxy share an address. Either way, the registry admits
            the streams of different addresses fairly.
    """

    body_timeout_ms: int = 30000
    keep_alive_timeout_ms: int = 5000
    max_connections: int | None = None
    max_streams_per_client: int | None = None

    @classmethod
    def from_config(cls, server: ServerConfig) -> HttpLimits:
        """The limits the `server.*` keys of the same names set."""
        return cls(body_timeout_ms=server.body_timeout_ms,
                   keep_alive_timeout_ms=server.keep_alive_timeout_ms,
                   max_connections=server.max_connections,
                   max_streams_per_client=server.max_streams_per_client)


# -- errors ---------------------------------------------------------------------------


def _error_body(error: CorralError, request_id: str) -> ErrorBody:
    status = status_of(error)
    field = error.details.get("field")
    return ErrorBody(ErrorDetail(
        message=error.message,
        type=_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        code=error.code.value, param=field if isinstance(field, str) else None,
        request_id=request_id, retryable=error.retryable))


def status_of(error: CorralError) -> int:
    """The HTTP status of an error: the table's, except 503 while the server shuts down
    (the table has no code of its own for that; the error is a retryable ServerError)
    and 408 for a request body that did not arrive in time (the client's Timeout)."""
    if error.details.get("shutting_down"):
        return 503
    if "body_timeout_ms" in error.details:
        return 408
    return error.spec.http


def _error_headers(error: CorralError) -> list[tuple[bytes, bytes]]:
    """Retry-After (whole seconds, rounded up) for the errors that carry a wait;
    Connection: close after a body that did not arrive in time (its rest may follow)."""
    headers = []
    retry_after_ms = error.details.get("retry_after_ms")
    if (error.code in (Code.OVERLOADED, Code.CIRCUIT_OPEN) or error.details.get(
            "shutting_down")) and isinstance(retry_after_ms, int | float):
        headers.append(_retry_after(retry_after_ms))
    if "body_timeout_ms" in error.details:
        headers.append((b"connection", b"close"))
    return headers


def _retry_after(ms: float) -> tuple[bytes, bytes]:
    return (b"retry-after", str(max(0, math.ceil(ms / 1000.0))).encode())


def _drain_wait_ms(drain_ms: int) -> int:
    """The wait a draining server's 503 tells: the drain's length (at least a second),
    the earliest a restarted server could answer at this address."""
    return max(drain_ms, 1000)


def _with_drain_wait(error: CorralError, drain_ms: int) -> CorralError:
    """A shutting-down error with the wait its 503 tells the client."""
    if not error.details.get("shutting_down") or "retry_after_ms" in error.details:
        return error
    return EngineClientError(error.code, error.message,
                             {**error.details, "retry_after_ms": _drain_wait_ms(drain_ms)},
                             retryable=error.retryable)


def _error_response(error: CorralError, request_id: str) -> Response:
    response = Response(_encode(_error_body(error, request_id)), status_of(error),
                        media_type="application/json")
    response.raw_headers.extend(_error_headers(error))
    return response


def _internal_error(exc: BaseException) -> CorralError:
    return EngineClientError(Code.INTERNAL_ERROR,
                             f"internal error in the HTTP server: {type(exc).__name__}")


def _explained(error: CorralError) -> CorralError:
    """Say what is supported for the fields accepted with their neutral value only."""
    field = error.details.get("field")
    if error.code is Code.INVALID_PARAMS and field in NEUTRAL_ONLY:
        return EngineClientError(Code.INVALID_PARAMS,
                                 f"{field}: not supported; only {NEUTRAL_ONLY[field]} is",
                                 error.details)
    return error


# -- requests ---------------------------------------------------------------------------


async def _read_json(request: Request, limit: int, timeout_ms: int) -> Any:
    """The request body as builtins, read within `timeout_ms`.

    Raises:
        EngineClientError: InvalidRequest for a body over `limit` bytes, ParseError for
            one that is not JSON, Timeout (`details["body_timeout_ms"]`, sent as 408)
            for one that did not arrive in time.
        ClientDisconnect: the client went away while sending it.
    """
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout_ms / 1000.0) as reading:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise EngineClientError(Code.INVALID_REQUEST,
                                        f"body: larger than {limit} bytes", {"limit": limit})
            parts.append(part)
    if reading.cancelled_caught:
        raise EngineClientError(
            Code.TIMEOUT, f"body: {size} bytes arrived in {timeout_ms / 1000.0:g}s, not all",
            {"body_timeout_ms": timeout_ms})
    return decode_json(b"".join(parts))


def _sampling(request: ChatCompletionRequest | CompletionRequest,
              max_tokens: int | None) -> dict[str, Any]:
    """Keyword arguments of `Runtime.generate` that both APIs share; the runtime checks
    their ranges and names the field."""
    params = {"model": request.model, "max_tokens": max_tokens,
              "temperature": request.temperature, "top_p": request.top_p,
              "top_k": request.top_k, "min_p": request.min_p,
              "repetition_penalty": request.repetition_penalty, "seed": request.seed,
              "stop": request.stop, "stop_token_ids": request.stop_token_ids,
              "timeout_ms": request.timeout_ms}
    return {key: value for key, value in params.items() if value is not None}


def _prompt(prompt: str | list[str | int]) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    ids = [item for item in prompt if isinstance(item, int)]
    if len(ids) != len(prompt):
        raise EngineClientError(Code.INVALID_PARAMS,
                                "prompt: batched prompts are not supported; send one string "
                                "or one list of token ids per request", {"field": "prompt"})
    return ids


def _finish(stream: TokenStream) -> Literal["stop", "length"]:
    """The OpenAI finish reason of a stream that ended without an error.

    Raises:
        EngineClientError: Cancelled, when the runtime ended it (an unloaded model).
    """
    reason: FinishReason | None = stream.finish_reason
    if reason == "stop" or reason == "length":
        return reason
    raise EngineClientError(Code.CANCELLED, f"the generation ended early: {reason}",
                            {"finish_reason": reason})


def _usage(usage: Usage) -> UsageInfo:
    return UsageInfo(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
                     PromptTokensDetails(usage.cached_tokens))


def _token_names(token_ids: Sequence[int]) -> list[str]:
    return [f"token_id:{token}" for token in token_ids]


def _clean(logprobs: Sequence[float]) -> list[float | None]:
    return [None if math.isnan(value) else value for value in logprobs]


# -- response shapes ------------------------------------------------------------------


class _ChatShape:
    """Chat completion bodies and chunks of one request."""

    def __init__(self, response_id: str, created: int) -> None:
        self._id = response_id
        self._created = created

    def _logprobs(self, token_ids: Sequence[int],
                  logprobs: Sequence[float] | None) -> ChatLogprobs | None:
        if logprobs is None:
            return None
        return ChatLogprobs([ChatTokenLogprob(name, value) for name, value in
                             zip(_token_names(token_ids), _clean(logprobs), strict=True)])

    def _chunk(self, model: str, choices: list[ChatChunkChoice],
               usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(self._id, self._created, model, choices, usage)

    def opening(self, model: str) -> list[msgspec.Struct]:
        return [self._chunk(model, [ChatChunkChoice(ChatDelta(role="assistant", content=""))])]

    def chunk(self, model: str, chunk: StreamChunk) -> msgspec.Struct | None:
        if not chunk.text and chunk.logprobs is None:
            return None
        return self._chunk(model, [ChatChunkChoice(
            ChatDelta(content=chunk.text),
            logprobs=self._logprobs(chunk.token_ids, chunk.logprobs))])

    def closing(self, model: str, finish: str, usage: Usage | None) -> list[msgspec.Struct]:
        events: list[msgspec.Struct] = [
            self._chunk(model, [ChatChunkChoice(ChatDelta(), finish_reason=finish)])]
        if usage is not None:
            events.append(self._chunk(model, [], _usage(usage)))
        return events

    def whole(self, stream: TokenStream, finish: str,
              logprobs: list[float] | None) -> msgspec.Struct:
        choice = ChatChoice(ChatMessageOut(stream.text), finish,
                            logprobs=self._logprobs(stream.token_ids, logprobs))
        return ChatCompletionResponse(self._id, self._created, stream.model, [choice],
                                      _usage(stream.usage))


class _CompletionShape:
    """Text completion bodies and chunks of one request."""

    def __init__(self, response_id: str, created: int) -> None:
        self._id = response_id
        self._created = created

    @staticmethod
    def _logprobs(token_ids: Sequence[int],
                  logprobs: Sequence[float] | None) -> CompletionLogprobs | None:
        if logprobs is None:
            return None
        return CompletionLogprobs(_token_names(token_ids), _clean(logprobs))

    def opening(self, model: str) -> list[msgspec.Struct]:
        return []

    def chunk(self, model: str, chunk: StreamChunk) -> msgspec.Struct | None:
        if not chunk.text and chunk.logprobs is None:
            return None
        return CompletionResponse(self._id, self._created, model, [CompletionChoice(
            chunk.text, logprobs=self._logprobs(chunk.token_ids, chunk.logprobs))])

    def closing(self, model: str, finish: str, usage: Usage | None) -> list[msgspec.Struct]:
        events: list[msgspec.Struct] = [CompletionResponse(
            self._id, self._created, model, [CompletionChoice("", finish_reason=finish)])]
        if usage is not None:
            events.append(CompletionResponse(self._id, self._created, model, [],
                                             _usage(usage)))
        return events

    def whole(self, stream: TokenStream, finish: str,
              logprobs: list[float] | None) -> msgspec.Struct:
        choice = CompletionChoice(stream.text, finish_reason=finish,
                                  logprobs=self._logprobs(stream.token_ids, logprobs))
        return CompletionResponse(self._id, self._created, stream.model, [choice],
                                  _usage(stream.usage))


_Shape = _ChatShape | _CompletionShape


class _Job(msgspec.Struct, frozen=True):
    """One validated generation request: the runtime's arguments and the reply's shape."""

    params: dict[str, Any]
    shape: _Shape
    stream: bool
    include_usage: bool
    logprobs: bool


def _chat_job(body: Any, request_id: str, client: str) -> _Job:
    request = convert_params(body, ChatCompletionRequest)
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)}
                for m in request.messages]
    params = _sampling(request, request.max_completion_tokens or request.max_tokens)
    options = request.stream_options
    return _Job({**params, "messages": messages, "logprobs": request.logprobs,
                 "request_id": request_id, "client": client},
                _ChatShape(f"chatcmpl-{request_id}", int(time.time())), request.stream,
                bool(options and options.include_usage), request.logprobs)


def _completion_job(body: Any, request_id: str, client: str) -> _Job:
    request = convert_params(body, CompletionRequest)
    logprobs = request.logprobs is not None
    params = _sampling(request, request.max_tokens)
    options = request.stream_options
    return _Job({**params, "prompt": _prompt(request.prompt), "logprobs": logprobs,
                 "request_id": request_id, "client": client},
                _CompletionShape(f"cmpl-{request_id}", int(time.time())), request.stream,
                bool(options and options.include_usage), logprobs)


# -- the exchange of one generation request -----------------------------------------------


@final
class _Exchange:
    """The sending side of one generation request; reports how it ended to metrics,
    once.

    Until something is sent, an error can still be an HTTP status; after the SSE
    headers it can only be the stream's last event.
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
        self.stream: TokenStream | None = None

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

    async def start_sse(self) -> None:
        self.sse_started = True
        await self._send({"type": "http.response.start", "status": 200,
                          "headers": list(_SSE_HEADERS)})

    async def event(self, data: msgspec.Struct) -> None:
        await self._send({"type": "http.response.body", "more_body": True,
                          "body": b"data: " + _encode(data) + b"\n\n"})

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
        error = _with_drain_wait(error, self._drain_ms)
        self.failed(error)
        if self.sse_started:
            await self.event(_error_body(error, self.request_id))
            await self.end_sse(done=False)
        else:
            await self.json(status_of(error), _error_body(error, self.request_id),
                            _error_headers(error))


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope,
                                exchange: _Exchange) -> None:
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


async def _last_words(exchange: _Exchange) -> None:
    """Tell a client whose reply the stopping server cuts short, rather than drop it.

    Runs shielded for at most `_LAST_WORDS_S`: the server is being cancelled.
    """
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _LAST_WORDS_S):
        try:
            await exchange.fail(EngineClientError(
                Code.TRANSPORT_ERROR, "the HTTP server stopped before the reply was complete",
                retryable=True))
        except Exception as exc:  # noqa: BLE001 - the connection may be gone already
            _log.info("http.last_words_undelivered", request_id=exchange.request_id,
                      error=repr(exc))


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@final
class _ClientStreams:
    """Generation requests open per client address, shared by both endpoints."""

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


@final
class _GenerateEndpoint:
    """POST /v1/completions or /v1/chat/completions, as a plain ASGI app.

    It owns the whole exchange, so that a disconnect cancels the generation whatever
    it is doing: waiting for admission, for tokens, or for the client to read. Errors
    before the first token get their HTTP status (the SSE headers wait for it). The
    client's address is the `client` of its streams for the registry's fair admission.
    """

    def __init__(self, runtime: Runtime, metrics: Metrics, kind: Literal["chat", "text"],
                 limits: HttpLimits, clients: _ClientStreams) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._make_job = _chat_job if kind == "chat" else _completion_job
        self._max_body = runtime.config.server.max_body_bytes
        self._drain_ms = runtime.config.server.drain_timeout_ms
        self._body_timeout_ms = limits.body_timeout_ms
        self._clients = clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        client = _client_address(scope)
        exchange = _Exchange(send, request_id, self._metrics, trio.current_time(),
                             self._drain_ms)
        try:
            body = await _read_json(Request(scope, receive), self._max_body,
                                    self._body_timeout_ms)
            job = self._make_job(body, request_id, f"http:{client}")
            self._clients.take(client)
        except ClientDisconnect:
            exchange.abandoned()
            return
        except CorralError as exc:
            await exchange.fail(_explained(exc))
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

    async def _run(self, job: _Job, exchange: _Exchange) -> None:
        try:
            if job.stream:
                await self._stream(job, exchange)
            else:
                await self._whole(job, exchange)
        except Exception as exc:  # noqa: BLE001 - the client gets every failure as a reply
            error = innermost(exc)
            if not isinstance(error, CorralError):
                _log.error("http.generation_failed", request_id=exchange.request_id,
                           exc_info=error)
                error = _internal_error(error)
            await exchange.fail(_explained(error))

    async def _stream(self, job: _Job, exchange: _Exchange) -> None:
        shape = job.shape
        async with self._runtime.generate(**job.params) as stream:
            exchange.stream = stream

            async def start() -> None:
                await exchange.start_sse()
                for opening in shape.opening(stream.model):
                    await exchange.event(opening)

            async for chunk in stream:
                if not exchange.sse_started:
                    await start()
                event = shape.chunk(stream.model, chunk)
                if event is not None:
                    await exchange.event(event)
            finish = _finish(stream)
            exchange.succeeded()
            if not exchange.sse_started:
                await start()
            for closing in shape.closing(stream.model, finish,
                                         stream.usage if job.include_usage else None):
                await exchange.event(closing)
        await exchange.end_sse(done=True)

    async def _whole(self, job: _Job, exchange: _Exchange) -> None:
        async with self._runtime.generate(**job.params) as stream:
            exchange.stream = stream
            logprobs: list[float] = []
            async for chunk in stream:
                if chunk.logprobs:
                    logprobs.extend(chunk.logprobs)
            body = job.shape.whole(stream, _finish(stream), logprobs if job.logprobs else None)
        exchange.succeeded()
        await exchange.json(200, body)


# -- the small routes -----------------------------------------------------------------


def _json(data: Any, status: int = 200) -> Response:
    return Response(_encode(data), status, media_type="application/json")


@final
class _Routes:
    """GET /v1/models, /v1/models/{id}, /health and /metrics."""

    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._created = int(time.time())

    def _cards(self) -> list[ModelCard]:
        return [ModelCard(id=m.alias, created=self._created, root=m.path,
                          max_model_len=m.info.max_context if m.info else None,
                          state=m.state, breaker=m.breaker)
                for m in self._runtime.list_models()]

    async def models(self, request: Request) -> Response:
        return _json(ModelList(self._cards()))

    async def model(self, request: Request) -> Response:
        alias = request.path_params["model"]
        for card in self._cards():
            if card.id == alias:
                return _json(card)
        return _error_response(
            EngineClientError(Code.MODEL_NOT_LOADED, f"model {alias!r} is not loaded",
                              {"model": alias}), request.state.request_id)

    async def health(self, request: Request) -> Response:
        """200, or 503 with the reasons; while draining, with the drain's Retry-After."""
        health = self._runtime.health()
        body = {"status": "ok" if health.ok else "unavailable", **msgspec.to_builtins(health)}
        response = _json(body, 200 if health.ok else 503)
        if not health.ok and self._runtime.draining:
            response.raw_headers.append(
                _retry_after(_drain_wait_ms(self._runtime.config.server.drain_timeout_ms)))
        return response

    async def metrics(self, request: Request) -> Response:
        return Response(await self._metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route, wrong method) in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    code = Code.METHOD_NOT_FOUND if exc.status_code == 404 else Code.INVALID_REQUEST
    error = EngineClientError(code, f"{request.method} {request.url.path}: {exc.detail}")
    response = _json(_error_body(error, request.state.request_id), exc.status_code)
    response.headers.update(exc.headers or {})
    return response


@final
class _RequestContext:
    """ASGI middleware: the request id (the client's `X-Request-Id`, or a new one) in
    the scope, the logs and the response headers; one `http.request` access log line
    per request; an InternalError body, not a bare 500, for a bug in a handler."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = time.perf_counter()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        with bind_request(request_id):
            try:
                await self._app(scope, receive, send_with_id)
            except ClientDisconnect:
                pass
            except Exception as exc:  # noqa: BLE001 - answered here, not by a bare 500
                _log.error("http.handler_failed", request_id=request_id, exc_info=exc)
                if status is None:
                    error = _internal_error(exc)
                    await _error_response(error, request_id)(scope, receive, send_with_id)
            finally:
                client = scope.get("client")
                _log.info("http.request", method=scope["method"], path=scope["path"],
                          status=status if status is not None else 499,
                          duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
                          request_id=request_id,
                          client=f"{client[0]}:{client[1]}" if client else None)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = bytes(value).decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def build_app(runtime: Runtime, metrics: Metrics, limits: HttpLimits | None = None
              ) -> Starlette:
    """The ASGI app of the HTTP API over `runtime`, reporting to `metrics`; of `limits`
    (default: the config's `server.*` keys) it applies the body timeout and the streams
    per client."""
    limits = limits or HttpLimits.from_config(runtime.config.server)
    routes = _Routes(runtime, metrics)
    clients = _ClientStreams(limits.max_streams_per_client,
                             runtime.config.stream_registry.overloaded_retry_after_ms)
    return Starlette(
        routes=[
            Route("/v1/completions",
                  _GenerateEndpoint(runtime, metrics, "text", limits, clients),
                  methods=["POST"]),
            Route("/v1/chat/completions",
                  _GenerateEndpoint(runtime, metrics, "chat", limits, clients),
                  methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{model:path}", routes.model, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
        ],
        middleware=[Middleware(_RequestContext)],
        exception_handlers={HTTPException: _http_exception})


# -- the supervised listener ------------------------------------------------------------


@final
class HttpServer:
    """The HTTP listener as a supervised child (of the transport domain).

    Start it with `await rt.start_transport(ChildSpec(name="http", factory=lambda:
    HttpServer(rt, host, port, metrics)))`. `run` reports started once the socket is
    bound; a stop request closes the listener, lets requests in flight finish for up to
    `server.drain_timeout_ms` (bounded by the ChildSpec's shutdown timeout), then
    returns. A killed server drops its connections and a restart binds the same port.

    Hypercorn serves each connection (its `TCPServer`, as its own trio worker does);
    the accept loop is this class's, so that it can cap the connections: one beyond
    `limits.max_connections` is answered 429 with Retry-After and closed at once.

    Attributes:
        port: the port asked for; once bound, the port bound (useful with port 0).
        binds: the URLs listened on, once bound.
        limits: what one client may hold (`HttpLimits`).
        max_connections: the connection cap in force.
        refused: connections refused at the cap, over all incarnations.
    """

    def __init__(self, runtime: Runtime, host: str, port: int, metrics: Metrics, *,
                 limits: HttpLimits | None = None) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self.host = host
        self.port = port
        self.binds: list[str] = []
        self.limits = limits or HttpLimits.from_config(runtime.config.server)
        self.max_connections = self.limits.max_connections or default_max_connections()
        self.refused = 0
        self._open = 0
        self._at_capacity = False

    @property
    def open_connections(self) -> int:
        return self._open

    def _hypercorn_config(self) -> HypercornConfig:
        config = HypercornConfig()
        host = f"[{self.host}]" if ":" in self.host else self.host
        config.bind = [f"{host}:{self.port}"]
        config.accesslog = None  # `http.request` is the access log
        # Through the logging module (the host application decides), not a stderr handler.
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = self._runtime.config.server.drain_timeout_ms / 1000.0
        config.keep_alive_timeout = self.limits.keep_alive_timeout_ms / 1000.0
        return config

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until a stop is requested.

        Raises:
            EngineClientError: TransportError when the address cannot be bound (in use,
                not local, no permission), before started is reported.
        """
        config = self._hypercorn_config()
        sockets: list[socket.socket] = []
        try:
            sockets = config.create_sockets().insecure_sockets
            for sock in sockets:
                sock.listen(config.backlog)
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise EngineClientError(
                Code.TRANSPORT_ERROR,
                f"http: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                {"host": self.host, "port": self.port}) from exc
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        self.binds = [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in sockets]
        self.port = int(sockets[0].getsockname()[1])
        # Starlette's ASGI types and hypercorn's differ only in their TypedDict names.
        app: Any = build_app(self._runtime, self._metrics, self.limits)
        context = WorkerContext(None)
        serve_one = functools.partial(
            self._connection, wrap_app(app, config.wsgi_max_body_size, "asgi"), config,
            context, ConnectionState({}))
        try:
            async with trio.open_nursery() as connections:
                ctx.log.debug("http.listening", binds=self.binds)
                task_status.started()
                try:
                    with trio.CancelScope() as accepting:
                        ctx.on_stop_requested(accepting.cancel)
                        if not ctx.stop_requested:
                            await trio.serve_listeners(serve_one, listeners,
                                                       handler_nursery=connections)
                finally:
                    # Idle keep-alive connections close now; requests get the drain.
                    await context.terminated.set()
                    connections.cancel_scope.deadline = (trio.current_time()
                                                         + config.graceful_timeout)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        ctx.log.debug("http.stopped", binds=self.binds)

    async def _connection(self, app: Any, config: HypercornConfig, context: WorkerContext,
                          state: ConnectionState, stream: trio.SocketStream) -> None:
        """Serve one accepted connection, or refuse it at the cap."""
        if self._open >= self.max_connections:
            await self._refuse(stream)
            return
        self._open += 1
        try:
            # Hypercorn's annotation names its TLS stream; its trio worker passes plain
            # socket streams as well.
            await TCPServer(app, config, context, state, stream).run()  # type: ignore[arg-type]
        finally:
            self._open -= 1
            self._at_capacity = False

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Answer 429 with Retry-After and close, within `_LAST_WORDS_S`; what the client
        sends meanwhile is read, so that closing does not reset the answer away."""
        self.refused += 1
        if not self._at_capacity:
            self._at_capacity = True
            _log.warning("http.connections_at_capacity", max_connections=self.max_connections)
        error = OverloadedError(
            f"the server has {self._open} connections open, the most it allows",
            self._runtime.config.stream_registry.overloaded_retry_after_ms,
            {"max_connections": self.max_connections})
        body = _encode(_error_body(error, uuid.uuid4().hex))
        head = [b"HTTP/1.1 429 Too Many Requests", b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(), b"connection: close",
                *(name + b": " + value for name, value in _error_headers(error))]
        with trio.move_on_after(_LAST_WORDS_S), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"\r\n".join(head) + b"\r\n\r\n" + body)
            await stream.send_eof()
            while await stream.receive_some(_RECEIVE_BYTES):
                pass
