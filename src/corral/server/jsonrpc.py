"""JSON-RPC 2.0 over newline-delimited JSON on stdio, TCP and unix sockets: the
listener a `corral serve` starts, and the methods each connection answers.

A `JsonRpcListener` is a child of the transport supervisor: it listens through
`listen.Listener` and serves each connection with a `connection.Connection` whose
session is a `Methods`. The methods build their typed params once, from the request,
and speak to the `Runtime` facade only: this module never reaches into actors, never
frames or writes bytes itself, and never invents an error number.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, final

import msgspec
import trio

from corral.actors.child_spec import ChildSpec
from corral.actors.context import Child, Context
from corral.protocol.errors import Code, CorralError, EngineClientError, TimeoutError
from corral.protocol.jsonrpc import (
    CancelParams,
    DetokenizeParams,
    InfoGeneration,
    InfoLimits,
    LoadModelParams,
    Method,
    NoParams,
    Notification,
    Request,
    RuntimeInfo,
    StreamChunkParams,
    StreamEndParams,
    StreamErrorParams,
    TokenizeParams,
    UnloadModelParams,
    encode_notification,
    encode_result,
    error_object,
    params_as,
)
from corral.protocol.messages import GenerateParams
from corral.protocol.openai import UsageInfo
from corral.runtime import ChoiceStreams, Runtime
from corral.server.connection import (
    ANSWERED,
    Answered,
    Call,
    Connection,
    ConnectionLimits,
    InlineCall,
    Respond,
    reply_id,
)
from corral.server.listen import Listener, ListenerStatistics, parse_uri

__all__ = ["JsonRpcListener", "ListenerStatistics", "Methods"]


@final
class JsonRpcListener:
    """Serves JSON-RPC on one address; a child of the transport supervisor.

    Start it with `await runtime.start_transport(listener.spec("jsonrpc"))`: that spec's
    factory returns this same object at every restart, so `port` and
    `shutdown_requested` stay valid for the caller. A spec whose factory makes a fresh
    listener per incarnation works as well. Each incarnation binds anew (with port 0, to
    a new port).

    `shutdown_requested` is set, and `on_shutdown()` called, when a client calls
    `shutdown` and, for stdio, when standard input ends (stdio has exactly one client).
    The listener does not stop the runtime itself: whoever embeds it (`corral serve`)
    waits for that and leaves `open_runtime`, whose graceful stop lets every connection
    finish its requests and flush its replies.

    For stdio the listener reads fd 0 and writes the original fd 1, and points fd 1 at
    standard error while it runs, so a stray print can never corrupt the protocol; both
    must be pipes, sockets or a terminal, not regular files.
    """

    def __init__(self, runtime: Runtime, uri: str, *,
                 on_shutdown: Callable[[], None] | None = None,
                 max_streams_per_connection: int | None = None) -> None:
        """Raises: ValueError for a URI that is not tcp://HOST:PORT, unix://PATH or stdio.

        Args:
            max_streams_per_connection: `generate` and `complete` calls one connection
                may have open at once; None takes `json_rpc.max_streams_per_connection`.
        """
        parse_uri(uri)  # a bad URI is refused before anything else is looked at
        config = runtime.config
        self.runtime = runtime
        self.uri = uri
        self.max_streams_per_connection = (
            config.json_rpc.max_streams_per_connection
            if max_streams_per_connection is None else max_streams_per_connection)
        self.shutdown_requested = trio.Event()
        self._on_shutdown = on_shutdown
        self._limits = ConnectionLimits(
            max_line_bytes=config.json_rpc.max_line_bytes,
            max_pending=config.json_rpc.max_pending_per_connection,
            max_streams=self.max_streams_per_connection,
            retry_after_ms=config.stream_registry.overloaded_retry_after_ms,
            shutdown_timeout_ms=config.supervision.shutdown_timeout_ms)
        self._listener = Listener(uri, self._handler,
                                  shutdown_ms=config.supervision.shutdown_timeout_ms,
                                  on_stdio_closed=self.request_shutdown)

    @property
    def address(self) -> tuple[str, int] | str | None:
        """The bound address ((host, port), or a socket path) while bound, else None."""
        return self._listener.address

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port 0), or None."""
        return self._listener.port

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return self._listener.open

    def spec(self, name: str = "jsonrpc") -> ChildSpec:
        """A ChildSpec for the transport supervisor: permanent.

        Its shutdown is `infinity`, as for a supervisor: each of its connections has a
        bounded shutdown of its own.
        """
        return ChildSpec(name=name, factory=lambda: self, shutdown="infinity")

    def statistics(self) -> ListenerStatistics:
        """A snapshot of this listener: its address and connection counters."""
        return self._listener.statistics()

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started, serve until a stop is requested.

        On a graceful stop it stops accepting, then stops its connections: each one
        finishes its requests within its shutdown timeout, flushes its replies and
        closes. Cancelled (killed), every connection closes at once.

        Raises:
            OSError: the address cannot be bound (a start failure for the supervisor).
        """
        await self._listener.run(ctx, task_status=task_status)

    def request_shutdown(self) -> None:
        """Set `shutdown_requested` and call `on_shutdown`, the first time only."""
        if self.shutdown_requested.is_set():
            return
        self.shutdown_requested.set()
        if self._on_shutdown is not None:
            self._on_shutdown()

    def info(self) -> RuntimeInfo:
        """What `runtime/info` answers: the server, this transport, methods and limits."""
        config = self.runtime.config
        return RuntimeInfo(
            name="corral", version=_version(), transport=self.uri,
            methods=[method.value for method in Method],
            notifications=[name.value for name in Notification],
            models=[model.alias for model in self.runtime.list_models()],
            limits=InfoLimits(
                max_line_bytes=config.json_rpc.max_line_bytes,
                max_pending_per_connection=config.json_rpc.max_pending_per_connection,
                max_streams_per_connection=self.max_streams_per_connection,
                default_timeout_ms=config.calls.default_timeout_ms,
                max_active_streams=config.stream_registry.max_active_streams,
                max_queued_streams=config.stream_registry.max_queued,
                max_tokens_limit=config.generation.max_tokens_limit),
            generation=InfoGeneration(
                isolation=config.generation.isolation,
                default_max_tokens=config.generation.default_max_tokens))

    def _handler(self, stream: trio.abc.Stream, *, stdio: bool) -> Child:
        return Connection(stream, functools.partial(Methods, self), self._limits,
                          answer_after_eof=stdio)


@functools.cache
def _version() -> str:
    try:
        return metadata.version("corral")
    except metadata.PackageNotFoundError:
        return "unknown"


@final
class Methods:
    """The methods of one connection, over the runtime facade (a `Session`).

    Each builds its typed params once, from the request: decoding them is the
    validation, so a wrong type or unknown field is InvalidParams naming the field. The
    connection is the `client` of its streams, whatever the request says.

    Attributes:
        calls: the methods run as tasks.
        inline: `cancel` and `shutdown`, answered at once.
    """

    def __init__(self, listener: JsonRpcListener, send: Respond, client: str) -> None:
        self._listener = listener
        self._runtime = listener.runtime
        self._send = send
        self._client = client
        self._streams: dict[int, trio.CancelScope] = {}
        self._unended: set[int] = set()  # stream ids told to the client, not yet ended
        self.calls: Mapping[Method, Call] = {
            Method.RUNTIME_INFO: self._runtime_info,
            Method.RUNTIME_STATE: self._runtime_state,
            Method.HEALTH: self._health,
            Method.LOAD_MODEL: self._load_model,
            Method.UNLOAD_MODEL: self._unload_model,
            Method.LIST_MODELS: self._list_models,
            Method.TOKENIZE: self._tokenize,
            Method.DETOKENIZE: self._detokenize,
            Method.GENERATE: self._generate,
            Method.COMPLETE: self._complete,
        }
        self.inline: Mapping[Method, InlineCall] = {
            Method.CANCEL: self._cancel,
            Method.SHUTDOWN: self._shutdown,
        }

    async def end_streams(self, cause: BaseException) -> None:
        """The connection crashed: its streams end in a typed, retryable error rather
        than in silence.

        Raises:
            trio.BrokenResourceError, trio.ClosedResourceError: the writer is gone.
        """
        for sid in sorted(self._unended):
            error = EngineClientError(
                Code.TRANSPORT_ERROR,
                f"stream {sid} ended: the connection failed ({type(cause).__name__})",
                {"stream_id": sid}, retryable=True)
            await self._send(encode_notification(
                Notification.STREAM_ERROR, StreamErrorParams(sid, error_object(error))))
        self._unended.clear()

    async def _runtime_info(self, request: Request, _: Respond) -> RuntimeInfo:
        params_as(request, NoParams)
        return self._listener.info()

    async def _runtime_state(self, request: Request, _: Respond) -> Any:
        params_as(request, NoParams)
        return await self._runtime.statistics()

    async def _health(self, request: Request, _: Respond) -> Any:
        params_as(request, NoParams)
        return self._runtime.health()

    async def _list_models(self, request: Request, _: Respond) -> Any:
        params_as(request, NoParams)
        return self._runtime.list_models()

    async def _load_model(self, request: Request, _: Respond) -> Any:
        params = params_as(request, LoadModelParams)
        return await self._runtime.load_model(params.path, alias=params.alias,
                                              fallbacks=tuple(params.fallbacks))

    async def _unload_model(self, request: Request, _: Respond) -> Any:
        params = params_as(request, UnloadModelParams)
        await self._runtime.unload_model(params.alias)
        return {"alias": params.alias, "unloaded": True}

    async def _tokenize(self, request: Request, _: Respond) -> Any:
        params = params_as(request, TokenizeParams)
        ids = await self._runtime.tokenize(params.model, params.text,
                                           add_special_tokens=params.add_special_tokens)
        return {"token_ids": ids}

    async def _detokenize(self, request: Request, _: Respond) -> Any:
        params = params_as(request, DetokenizeParams)
        return {"text": await self._runtime.detokenize(params.model, params.token_ids)}

    def _generate_params(self, request: Request) -> GenerateParams:
        """The request's params, with this connection as their client."""
        return msgspec.structs.replace(params_as(request, GenerateParams), client=self._client)

    async def _complete(self, request: Request, _: Respond) -> Any:
        try:
            completion = await self._runtime.run(self._generate_params(request))
        except TimeoutError as exc:
            raise exc.for_method(Method.COMPLETE.value) from None
        return {**msgspec.to_builtins(completion), "usage": UsageInfo.of(completion.usage)}

    async def _generate(self, request: Request, respond: Respond) -> Answered:
        """Answer with the stream id, then send the stream as notifications.

        `cancel` or leaving ends the `generate` block, which drops the sequence from the
        batch at the next engine step.
        """
        async with self._runtime.choices(self._generate_params(request)) as stream:
            sid = stream.stream_id
            self._unended.add(sid)
            await respond(encode_result(reply_id(request), {
                "stream_id": sid, "model": stream.model, "fallback": stream.fallback}))
            with trio.CancelScope() as cancelled:
                self._streams[sid] = cancelled
                try:
                    await self._forward(stream)
                finally:
                    self._streams.pop(sid, None)
        if cancelled.cancelled_caught:
            await self._send(encode_notification(Notification.STREAM_END, StreamEndParams(
                sid, "cancelled", UsageInfo.of(stream.usage),
                ["cancelled"] * len(stream.streams) if len(stream.streams) > 1 else [])))
        self._unended.discard(sid)
        return ANSWERED

    async def _forward(self, stream: ChoiceStreams) -> None:
        """Send the chunks of every choice, then stream.end or stream.error."""
        sid = stream.stream_id
        try:
            async for chunk in stream:
                if chunk.finish_reason is None:
                    await self._send(encode_notification(
                        Notification.STREAM_CHUNK, StreamChunkParams(
                            sid, chunk.text, chunk.token_ids, chunk.index, chunk.logprobs,
                            chunk.tokens, chunk.top_logprobs, chunk.choice,
                            chunk.tool_calls)))
        except CorralError as exc:
            end = encode_notification(Notification.STREAM_ERROR,
                                      StreamErrorParams(sid, error_object(exc)))
        else:
            reasons = [s.finish_reason for s in stream.streams]
            end = encode_notification(Notification.STREAM_END, StreamEndParams(
                sid, reasons[0], UsageInfo.of(stream.usage),
                reasons if len(reasons) > 1 else []))
        # Out of reach of `cancel` from here on: one terminal notification at most.
        del self._streams[sid]
        await self._send(end)
        self._unended.discard(sid)

    def _cancel(self, request: Request) -> Any:
        stream_id = params_as(request, CancelParams).stream_id
        scope = self._streams.get(stream_id)
        if scope is not None:
            scope.cancel()
        return {"stream_id": stream_id, "cancelled": scope is not None}

    def _shutdown(self, request: Request) -> Any:
        params_as(request, NoParams)
        self._listener.request_shutdown()
        return {"shutdown": True}
