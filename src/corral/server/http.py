"""The HTTP transport: ASGI plumbing (the app, its middleware and Starlette's own
errors) and the supervised listener, served by Hypercorn's trio worker and Starlette.

The APIs it serves (the README lists them): OpenAI's POST /v1/completions and
/v1/chat/completions (`openai_routes.py`) and its Responses API, POST /v1/responses and
GET/DELETE /v1/responses/{id} (`responses.py`); vLLM's POST /tokenize and /detokenize
(`tokenize.py`); Anthropic's POST /v1/messages and
/v1/messages/count_tokens (`anthropic_routes.py`); Ollama's under /api
(`ollama_routes.py`); GET /v1/models[/{id}], /health and /metrics (`routes.py`); with
an admin API key (`admin.py`), POST /v1/models/load and /v1/models/unload. Every error
leaves in its API's error shape with corral's code name and the request id, its
status from the error table (`errors.py`). With `server.api_keys`, every route but the
probes and the admin routes needs a key (`auth.py`); with `server.cors_origins`,
browsers of those origins may call the API. This module never shapes a body or calls
the runtime's request methods itself, and holds no state a restart of the HTTP server
would lose.

What one client can hold is bounded (`HttpLimits`): a request body has a deadline, a
connection with no request in progress closes after the keep-alive timeout, open
connections are capped, and so, optionally, are the generation requests of one client
address. Hypercorn's own `read_timeout` is not used: it bounds every read of a
connection, so it would also end an SSE reply whose client sends nothing while it
reads, which is what every SSE client does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import resource
import socket
import time
import uuid
from typing import Any, Final, final

import msgspec
import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.actors.context import Context
from corral.config import ServerConfig
from corral.logging import bind_request
from corral.metrics import Metrics
from corral.protocol.errors import Code, EngineClientError, OverloadedError
from corral.runtime import Runtime
from corral.server.admin import AdminRoutes
from corral.server.anthropic import ANTHROPIC_ERRORS
from corral.server.anthropic_routes import anthropic_routes
from corral.server.auth import ApiKeys
from corral.server.bodies import error_response
from corral.server.errors import ErrorShape, error_headers, internal_error
from corral.server.exchange import LAST_WORDS_S, ClientStreams
from corral.server.hypercorn_connection import ConnectionServer
from corral.server.lingering import LingeringStream
from corral.server.ollama import OLLAMA_ERRORS
from corral.server.ollama_routes import ollama_routes
from corral.server.openai import OPENAI_ERRORS, error_body
from corral.server.openai_routes import openai_routes
from corral.server.responses import responses_routes
from corral.server.routes import Routes
from corral.server.tokenize import tokenize_routes

__all__ = ["HttpLimits", "HttpServer", "build_app", "default_max_connections"]

_log = structlog.get_logger("corral.http")

_REQUEST_ID: Final = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII, as log-safe as ids go
_encode = msgspec.json.Encoder().encode
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


def _errors_for(path: str) -> ErrorShape:
    """The error shape of the API `path` belongs to: Anthropic's under /v1/messages,
    Ollama's under /api (and its probe, /), else OpenAI's."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ANTHROPIC_ERRORS
    if path == "/" or path.startswith("/api/"):
        return OLLAMA_ERRORS
    return OPENAI_ERRORS


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route, wrong method) in the path's API's error shape."""
    assert isinstance(exc, HTTPException)
    code = Code.METHOD_NOT_FOUND if exc.status_code == 404 else Code.INVALID_REQUEST
    error = EngineClientError(code, f"{request.method} {request.url.path}: {exc.detail}")
    errors = _errors_for(request.url.path)
    response = Response(_encode(errors.body(error, request.state.request_id)),
                        exc.status_code, media_type="application/json")
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
            except Exception as exc:  # answered here, not by a bare 500
                _log.error("http.handler_failed", request_id=request_id, exc_info=exc)
                if status is None:
                    error = internal_error(exc)
                    await error_response(error, request_id)(scope, receive, send_with_id)
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


def build_app(runtime: Runtime, metrics: Metrics | None = None,
              limits: HttpLimits | None = None) -> Starlette:
    """The ASGI app of the HTTP API over `runtime`, to embed in a server of one's own.

    Args:
        metrics: where requests are counted and what /metrics shows; None: a new
            `Metrics(runtime)`.
        limits: of these the app applies the body timeout and the streams per client
            (the connection cap and keep-alive belong to the server); None: the
            config's `server.*` keys.
    """
    metrics = metrics or Metrics(runtime)
    limits = limits or HttpLimits.from_config(runtime.config.server)
    routes = Routes(runtime, metrics)
    admin = AdminRoutes(runtime, runtime.config.server.admin_api_key,
                        body_timeout_ms=limits.body_timeout_ms)
    clients = ClientStreams(limits.max_streams_per_client,
                            runtime.config.stream_registry.overloaded_retry_after_ms)

    server = runtime.config.server
    middleware = [Middleware(_RequestContext)]
    if server.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(server.cors_origins),
                                     allow_methods=["*"], allow_headers=["*"],
                                     expose_headers=["x-request-id", "retry-after"]))
    if server.api_keys:
        middleware.append(Middleware(ApiKeys, keys=server.api_keys, errors_for=_errors_for,
                                     max_body=server.max_body_bytes,
                                     body_timeout_ms=limits.body_timeout_ms))
    apis = [route for api_routes in (openai_routes, responses_routes, anthropic_routes,
                                     ollama_routes)
            for route in api_routes(runtime, metrics, body_timeout_ms=limits.body_timeout_ms,
                                    clients=clients)]
    return Starlette(
        routes=[
            *apis,
            Route("/v1/models/load", admin.load, methods=["POST"]),
            Route("/v1/models/unload", admin.unload, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{model:path}", routes.model, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            *tokenize_routes(runtime, body_timeout_ms=limits.body_timeout_ms),
        ],
        middleware=middleware,
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
        """Connections open now (refused ones aside)."""
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

        A stop request closes the listener; idle connections close at once, requests
        in flight get `server.drain_timeout_ms`, then are cancelled (a reply cut short
        ends with a TransportError event or body). Cancelled (killed), every
        connection drops at once. The sockets are closed however it returns.

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
        wire = LingeringStream(stream)
        try:
            # Hypercorn's annotation names its TLS stream; its trio worker passes plain
            # socket streams as well.
            await ConnectionServer(app, config, context, state, wire).run()  # type: ignore[arg-type]
        finally:
            await wire.linger_and_close()
            self._open -= 1
            self._at_capacity = False

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Answer 429 with Retry-After and close, lingering (`LingeringStream`), so
        that closing does not reset the answer away."""
        self.refused += 1
        if not self._at_capacity:
            self._at_capacity = True
            _log.warning("http.connections_at_capacity", max_connections=self.max_connections)
        error = OverloadedError(
            f"the server has {self._open} connections open, the most it allows",
            self._runtime.config.stream_registry.overloaded_retry_after_ms,
            {"max_connections": self.max_connections})
        body = _encode(error_body(error, uuid.uuid4().hex))
        head = [b"HTTP/1.1 429 Too Many Requests", b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(), b"connection: close",
                *(name + b": " + value for name, value in error_headers(error))]
        wire = LingeringStream(stream)
        try:
            with trio.move_on_after(LAST_WORDS_S), contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError):
                await wire.send_all(b"\r\n".join(head) + b"\r\n\r\n" + body)
        finally:
            await wire.linger_and_close()
