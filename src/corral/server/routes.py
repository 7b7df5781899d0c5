"""The HTTP API's endpoints as ASGI apps: POST /v1/completions and
/v1/chat/completions (one exchange per request), and GET /v1/models[/{id}], /health and
/metrics.

A generation endpoint owns its whole exchange, so that a client that goes away cancels
its generation, streaming or not, and an error after a stream has started is its last
SSE event, never a dropped connection. Endpoints speak to the runtime facade only: this
module never reaches into actors, holds no state a restart of the HTTP server would
lose (per-client counts aside, which end with their requests), and leaves the shapes
of bodies and the status of errors to `openai.py`.
"""

from __future__ import annotations

import time
from typing import Any, Literal, final

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from corral.metrics import Metrics
from corral.protocol.codec import decode_json
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.openai import ModelCard, ModelList
from corral.runtime import ChoiceStreams, ModelDescription, Runtime
from corral.server.exchange import (
    LAST_WORDS_S,
    ClientStreams,
    Exchange,
    client_address,
    failure,
    run_exchange,
)
from corral.server.openai import (
    Job,
    chat_job,
    completion_job,
    drain_wait_ms,
    error_body,
    error_headers,
    explained,
    finish_reason,
    retry_after,
    status_of,
)

__all__ = ["LAST_WORDS_S", "ClientStreams", "GenerateEndpoint", "Routes", "error_response",
           "json_response", "model_card", "read_body", "read_json"]

_encode = msgspec.json.Encoder().encode


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


@final
class GenerateEndpoint:
    """POST /v1/completions or /v1/chat/completions, as a plain ASGI app.

    It owns the whole exchange, so that a disconnect cancels the generation whatever
    it is doing: waiting for admission, for tokens, or for the client to read. Errors
    before the first token get their HTTP status (the SSE headers wait for it). The
    client's address is the `client` of its streams for the registry's fair admission.
    Cancelled (the server stops), a reply cut short ends with a TransportError the
    client is told within `LAST_WORDS_S`.

    Args:
        body_timeout_ms: a request's whole body must arrive within this.
        clients: the per-address count both endpoints share.
    """

    def __init__(self, runtime: Runtime, metrics: Metrics, kind: Literal["chat", "text"], *,
                 body_timeout_ms: int, clients: ClientStreams) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._make_job = chat_job if kind == "chat" else completion_job
        self._method = "chat.completions" if kind == "chat" else "completions"
        self._max_body = runtime.config.server.max_body_bytes
        self._drain_ms = runtime.config.server.drain_timeout_ms
        self._body_timeout_ms = body_timeout_ms
        self._clients = clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        client = client_address(scope)
        exchange = Exchange(send, request_id, self._metrics, trio.current_time(),
                            self._drain_ms)
        try:
            body = await read_json(Request(scope, receive), self._max_body,
                                    self._body_timeout_ms)
            job = self._make_job(body, request_id, f"http:{client}")
        except ClientDisconnect:
            exchange.abandoned()
            return
        except CorralError as exc:
            await exchange.fail(explained(exc))
            return
        await run_exchange(exchange, receive, self._clients, client,
                           lambda: self._run(job, exchange))

    async def _run(self, job: Job, exchange: Exchange) -> None:
        try:
            if job.stream:
                await self._stream(job, exchange)
            else:
                await self._whole(job, exchange)
        except Exception as exc:  # the client gets every failure as a reply
            await exchange.fail(explained(failure(exc, self._method, exchange.request_id)))

    async def _stream(self, job: Job, exchange: Exchange) -> None:
        """SSE: each choice's chunks as they come (`index` names the choice), each
        choice's finish reason as it ends, then the usage when asked."""
        shape = job.shape
        async with self._runtime.choices(job.params) as choices:
            exchange.stream = choices
            model = choices.model
            async for chunk in choices:
                if not exchange.sse_started:
                    await exchange.start_sse(fallback_headers(choices))
                    for opening in shape.opening(model, job.params.n):
                        await exchange.event(opening)
                event: msgspec.Struct | None
                if chunk.finish_reason is not None:
                    event = shape.ending(model, chunk.choice, finish_reason(chunk.finish_reason))
                else:
                    event = shape.chunk(model, chunk)
                if event is not None:
                    await exchange.event(event)
            exchange.succeeded()
            if job.include_usage:
                await exchange.event(shape.usage(model, choices.usage))
        await exchange.end_sse(done=True)

    async def _whole(self, job: Job, exchange: Exchange) -> None:
        async with self._runtime.choices(job.params) as choices:
            exchange.stream = choices
            body = job.shape.whole(await choices.completion())
        exchange.succeeded()
        await exchange.json(200, body, fallback_headers(choices))


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
