"""JSON-RPC 2.0 over newline-delimited JSON on stdio, TCP and unix sockets.

A `JsonRpcListener` is a child of the transport supervisor. It accepts connections and
runs one handler per connection as a temporary child of its own dynamic supervisor, so a
crashed handler takes down its own connection only and is never restarted. A handler
frames lines, answers what it cannot parse with a typed error and keeps the connection,
runs each request in its own task, and sends every reply and stream notification through
one writer task, so lines never interleave. Envelopes come from `protocol/jsonrpc.py`;
this module never invents an error number and never touches a model except through the
`Runtime` facade.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import stat
import sys
from collections.abc import Awaitable, Callable, Iterator
from importlib import metadata
from typing import Any, Final, Literal, final
from urllib.parse import urlsplit

import msgspec
import structlog
import trio

from corral.actors.core import ActorRef, Context
from corral.actors.supervisor import ChildSpec, Restart, Strategy, Supervisor
from corral.protocol.errors import Code, CorralError, EngineClientError, OverloadedError
from corral.protocol.jsonrpc import (
    ErrorResponse,
    InvalidItem,
    Method,
    Notification,
    ParsedItem,
    Request,
    RequestId,
    encode_batch,
    encode_error,
    encode_notification,
    encode_result,
    params_as,
    parse_message,
)
from corral.protocol.messages import (
    GenerateParams,
    Name,
    StreamId,
    TokenId,
    Usage,
    innermost,
)
from corral.runtime import Runtime, TokenStream

__all__ = ["JsonRpcListener", "ListenerStatistics"]

_RECEIVE_BYTES: Final = 65536
_QUEUED_LINES: Final = 64  # lines waiting for the writer before senders wait
_LINES_PER_WRITE: Final = 64
# accept() errors that mean "overloaded for now" (as trio.serve_listeners treats them).
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                                            errno.ENOBUFS})
_ACCEPT_RETRY_S: Final = 0.1
_STREAM_METHODS: Final = frozenset({Method.GENERATE, Method.COMPLETE})

_log = structlog.get_logger("corral.server.jsonrpc")


# -- method params ---------------------------------------------------------------------
# Decoding these is the validation: a wrong type or unknown field is InvalidParams
# naming the field. Positional params fill fields in declaration order.


class _NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class _LoadModelParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    path: str
    alias: Name | None = None
    fallbacks: list[Name] = []


class _UnloadModelParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    alias: Name


class _TokenizeParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: Name | None = None
    text: str
    add_special_tokens: bool = True


class _DetokenizeParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: Name | None = None
    token_ids: list[TokenId]


class _CancelParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    stream_id: StreamId


class ListenerStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one listener.

    Attributes:
        uri: what it listens on.
        address: the bound address (host and port, or a socket path), None for stdio or
            before it is bound.
        accepted: connections accepted since the listener was made, over all restarts.
        open: connections open now.
    """

    uri: str
    address: str | None
    accepted: int
    open: int


_Kind = Literal["tcp", "unix", "stdio"]


def _parse_uri(uri: str) -> tuple[_Kind, str, int]:
    if uri == "stdio":
        return "stdio", "", 0
    if uri.startswith("unix://") and len(uri) > len("unix://"):
        return "unix", uri[len("unix://"):], 0
    parts = urlsplit(uri)
    if parts.scheme == "tcp" and parts.hostname:
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is not None and not parts.path:
            return "tcp", parts.hostname, port
    raise ValueError(f"expected tcp://HOST:PORT, unix://PATH or stdio, got {uri!r}")


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
        self._kind, self._host, self._port = _parse_uri(uri)
        self.runtime = runtime
        self.uri = uri
        self._on_shutdown = on_shutdown
        self.max_streams_per_connection = (
            runtime.config.json_rpc.max_streams_per_connection
            if max_streams_per_connection is None else max_streams_per_connection)
        self.shutdown_requested = trio.Event()
        self.address: tuple[str, int] | str | None = None
        self._numbers = itertools.count(1)
        self._accepted = 0
        self._open = 0

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port 0), or None."""
        return self.address[1] if isinstance(self.address, tuple) else None

    def spec(self, name: str = "jsonrpc") -> ChildSpec:
        """A ChildSpec for the transport supervisor: permanent.

        Its shutdown is `infinity`, as for a supervisor: each of its connections has a
        bounded shutdown of its own.
        """
        return ChildSpec(name=name, factory=lambda: self, shutdown="infinity")

    def statistics(self) -> ListenerStatistics:
        address = self.address
        shown = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else address
        return ListenerStatistics(self.uri, shown, self._accepted, self._open)

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started, serve until a stop is requested.

        On a graceful stop it stops accepting, then stops its connections: each one
        finishes its requests within its shutdown timeout, flushes its replies and
        closes. Cancelled (killed), every connection closes at once.

        Raises:
            OSError: the address cannot be bound (a start failure for the supervisor).
        """
        connections = Supervisor(strategy=Strategy.DYNAMIC)
        connections_ctx = Context(f"{ctx.path}/connections", ctx.system)
        serving = trio.CancelScope()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(connections.run, connections_ctx)
                if self._kind == "stdio":
                    await nursery.start(self._serve_stdio, connections, serving)
                else:
                    listeners = await self._bind()
                    nursery.start_soon(self._accept, listeners, connections, serving)
                task_status.started()
                await ctx.wait_stop_requested()
                serving.cancel()
                connections_ctx.request_stop()
        finally:
            connections_ctx.mailbox.stop()
            if self._kind == "unix" and self.address is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._host)  # ours: only a bound listener sets `address`
            self.address = None

    async def _bind(self) -> list[trio.SocketListener]:
        if self._kind == "tcp":
            listeners = await trio.open_tcp_listeners(self._port, host=self._host)
            host, port = listeners[0].socket.getsockname()[:2]
            self.address = (host, port)
            return listeners
        path = self._host
        await _remove_stale_socket(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen()
        except BaseException:
            sock.close()
            raise
        self.address = path
        return [trio.SocketListener(sock)]

    async def _accept(self, listeners: list[trio.SocketListener], connections: Supervisor,
                      serving: trio.CancelScope) -> None:
        with serving:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_on, listener, connections)

    async def _accept_on(self, listener: trio.SocketListener, connections: Supervisor) -> None:
        # Not trio.serve_listeners: it closes each stream when its handler returns, and
        # here the handler is a supervised child that outlives the call that starts it.
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    _log.error("jsonrpc.accept_failed", uri=self.uri,
                               error=errno.errorcode.get(exc.errno or 0, str(exc.errno)))
                    await trio.sleep(_ACCEPT_RETRY_S)
                    continue
                await self._start_connection(connections, f"conn-{next(self._numbers)}",
                                             stream)

    async def _serve_stdio(self, connections: Supervisor, serving: trio.CancelScope, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        with _stdio_stream() as stream:
            ref = await self._start_connection(connections, "stdio", stream)
            task_status.started()
            if ref is None:
                return
            with serving:
                await ref.wait_exit()
                self._request_shutdown()

    async def _start_connection(self, connections: Supervisor, name: str,
                                stream: trio.abc.Stream) -> ActorRef | None:
        """Start a handler for `stream`; returns its ActorRef, or None if it could not."""
        handler = _Connection(self, stream, answer_after_eof=name == "stdio")
        spec = ChildSpec(name=name, factory=lambda: handler, restart=Restart.TEMPORARY,
                         shutdown=self.runtime.config.supervision.shutdown_timeout_ms)
        try:
            ref = await connections.start_child(spec)
        except CorralError:
            await trio.aclose_forcefully(stream)  # the supervisor is stopping
            return None
        self._accepted += 1
        return ref

    def _request_shutdown(self) -> None:
        if self.shutdown_requested.is_set():
            return
        self.shutdown_requested.set()
        if self._on_shutdown is not None:
            self._on_shutdown()

    def _info(self) -> dict[str, Any]:
        config = self.runtime.config
        return {
            "name": "corral",
            "version": _version(),
            "transport": self.uri,
            "methods": [method.value for method in Method],
            "notifications": [name.value for name in Notification],
            "models": [model.alias for model in self.runtime.list_models()],
            "limits": {
                "max_line_bytes": config.json_rpc.max_line_bytes,
                "max_pending_per_connection": config.json_rpc.max_pending_per_connection,
                "max_streams_per_connection": self.max_streams_per_connection,
                "default_timeout_ms": config.json_rpc.default_timeout_ms,
                "max_active_streams": config.stream_registry.max_active_streams,
                "max_queued_streams": config.stream_registry.max_queued,
                "max_tokens_limit": config.generation.max_tokens_limit,
            },
            "generation": {"isolation": config.generation.isolation,
                           "default_max_tokens": config.generation.default_max_tokens},
        }


@functools.cache
def _version() -> str:
    try:
        return metadata.version("corral")
    except metadata.PackageNotFoundError:
        return "unknown"


async def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse to steal a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    try:
        stream = await trio.open_unix_socket(path)
    except OSError:
        os.unlink(path)
        return
    await stream.aclose()
    raise OSError(f"{path} is in use by another server")


@contextlib.contextmanager
def _stdio_stream() -> Iterator[trio.StapledStream[Any, Any]]:
    """fd 0 and the original fd 1 as one stream; fd 1 points at stderr meanwhile."""
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    stream = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)),
                                trio.lowlevel.FdStream(os.dup(0)))
    os.dup2(2, 1)
    try:
        yield stream
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)


# -- one connection --------------------------------------------------------------------


_Respond = Callable[[bytes], Awaitable[None]]


class _Batch:
    """The replies of one batch, sent as one array once every member has answered.

    A member that keeps running after its answer (a generate stream) waits for `sent`,
    so its notifications follow the array that told the client its stream id.
    """

    def __init__(self, size: int) -> None:
        self.replies: list[bytes | None] = [None] * size
        self._missing = size
        self.complete = trio.Event()
        self.sent = trio.Event()

    def answer(self, index: int, reply: bytes | None) -> None:
        self.replies[index] = reply
        self._missing -= 1
        if self._missing == 0:
            self.complete.set()

    def responder(self, index: int) -> _Respond:
        async def respond(reply: bytes) -> None:
            if self.replies[index] is None:
                self.answer(index, reply)
            await self.sent.wait()

        return respond


class _Streaming:
    """Returned by a method that answered the request itself."""


_STREAMING: Final = _Streaming()


@final
class _Connection:
    """Serves one connection until it closes, crashes or is stopped.

    Reading: lines longer than `json_rpc.max_line_bytes` are answered with InvalidRequest
    (id null) and skipped up to their newline; every other line is parsed and each
    request starts a task, at most `json_rpc.max_pending_per_connection` at once (a
    generate counts until its stream ends), and of those at most
    `max_streams_per_connection` generate or complete calls; beyond either a request
    gets Overloaded. `cancel` and `shutdown` are answered at once and need no slot, so
    a client can always free its slots. Bytes left without a newline at the end of
    input are a cut frame: ParseError. The connection is the `client` of its streams
    for the registry's fair admission.

    Closing: at the end of input or a failed write the peer is gone, and its requests
    and streams are cancelled at once; on stdio the end of input only means no more
    requests (`printf ... | corral serve --jsonrpc stdio`), so what was read is answered
    first. On a stop request reading ends, running requests
    finish (bounded by the handler's shutdown timeout) and queued replies are flushed.
    A bug in one request (an exception that is not a CorralError) answers it with
    InternalError, ends every other stream of the connection with a stream.error, and
    crashes the connection, which is never restarted.
    """

    def __init__(self, listener: JsonRpcListener, stream: trio.abc.Stream, *,
                 answer_after_eof: bool = False) -> None:
        self._listener = listener
        self._answer_after_eof = answer_after_eof
        self._runtime = listener.runtime
        self._stream = stream
        config = listener.runtime.config
        self._max_line = config.json_rpc.max_line_bytes
        self._max_pending = config.json_rpc.max_pending_per_connection
        self._max_streams = listener.max_streams_per_connection
        self._retry_after_ms = config.stream_registry.overloaded_retry_after_ms
        self._flush_timeout = config.supervision.shutdown_timeout_ms / 1000.0
        self._pending = 0
        self._open_streams = 0  # generate and complete calls running
        self._client = ""  # the connection's actor path, once it runs
        self._streams: dict[int, trio.CancelScope] = {}
        self._unended: set[int] = set()  # stream ids told to the client, not yet ended
        self._out: trio.MemorySendChannel[bytes] | None = None
        self._tasks: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._methods: dict[Method, Callable[[Request, _Respond], Awaitable[Any]]] = {
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
        self._inline: dict[Method, Callable[[Request], Any]] = {
            Method.CANCEL: self._cancel,
            Method.SHUTDOWN: self._shutdown,
        }

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log = ctx.log
        self._client = ctx.path
        send, receive = trio.open_memory_channel[bytes](_QUEUED_LINES)
        self._out = send
        flushed = trio.Event()
        self._listener._open += 1
        task_status.started()
        log.debug("jsonrpc.connection_opened")
        try:
            with self._scope:
                async with trio.open_nursery() as connection:
                    connection.start_soon(self._write, receive, flushed)
                    try:
                        async with trio.open_nursery() as tasks:
                            self._tasks = tasks
                            with trio.CancelScope() as reading:
                                ctx.on_stop_requested(reading.cancel)
                                if ctx.stop_requested:
                                    reading.cancel()
                                await self._read()
                            if not (reading.cancelled_caught or self._answer_after_eof):
                                tasks.cancel_scope.cancel()  # the peer is gone: so is its work
                    except Exception as exc:
                        with trio.move_on_after(self._flush_timeout), contextlib.suppress(
                                trio.BrokenResourceError, trio.ClosedResourceError):
                            await self._end_streams_on_crash(innermost(exc))
                            await send.aclose()
                            await flushed.wait()
                        raise
                    with trio.move_on_after(self._flush_timeout):
                        await send.aclose()
                        await flushed.wait()
                    connection.cancel_scope.cancel()
        finally:
            self._listener._open -= 1
            await trio.aclose_forcefully(self._stream)
            log.debug("jsonrpc.connection_closed")

    # -- framing -------------------------------------------------------------------

    async def _read(self) -> None:
        """Read lines until the end of input (or the peer is gone)."""
        buffer = bytearray()
        searched = 0  # bytes of `buffer` already known to hold no newline
        discarding = False  # inside a line that was too long, until its newline
        while True:
            try:
                data = await self._stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                if buffer and not discarding:
                    await self._send(encode_error(None, EngineClientError(
                        Code.PARSE_ERROR,
                        "incomplete message: the input ended before its newline")))
                return
            if discarding:
                newline = data.find(b"\n")
                if newline < 0:
                    continue
                discarding = False
                data = data[newline + 1:]
            buffer += data
            start = 0
            while (newline := buffer.find(b"\n", max(start, searched))) >= 0:
                line = bytes(buffer[start:newline])
                start = newline + 1
                if len(line) > self._max_line:
                    await self._too_long()
                else:
                    await self._on_line(line)
            del buffer[:start]
            searched = len(buffer)
            if len(buffer) > self._max_line:
                await self._too_long()
                buffer.clear()
                searched = 0
                discarding = True

    async def _end_streams_on_crash(self, cause: BaseException) -> None:
        """A request's bug crashes the connection: its other streams end in a typed,
        retryable error rather than in silence."""
        for sid in sorted(self._unended):
            error = EngineClientError(
                Code.TRANSPORT_ERROR,
                f"stream {sid} ended: the connection failed ({type(cause).__name__})",
                {"stream_id": sid}, retryable=True)
            await self._send(encode_notification(
                Notification.STREAM_ERROR, {"stream_id": sid, "error": _error_object(error)}))
        self._unended.clear()

    async def _too_long(self) -> None:
        await self._send(encode_error(None, EngineClientError(
            Code.INVALID_REQUEST, f"line too long: over {self._max_line} bytes",
            {"max_line_bytes": self._max_line})))

    async def _send(self, line: bytes) -> None:
        assert self._out is not None
        await self._out.send(line)

    async def _notify(self, method: Notification, params: dict[str, Any]) -> None:
        await self._send(encode_notification(method, params))

    async def _write(self, lines: trio.MemoryReceiveChannel[bytes], flushed: trio.Event) -> None:
        """The only writer: whole lines, several per write when they queue up."""
        try:
            async with lines:
                async for first in lines:
                    chunk = [first]
                    while len(chunk) < _LINES_PER_WRITE:
                        try:
                            chunk.append(lines.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    chunk.append(b"")
                    try:
                        await self._stream.send_all(b"\n".join(chunk))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._scope.cancel()  # the peer is gone
                        return
        finally:
            flushed.set()

    # -- dispatch --------------------------------------------------------------------

    async def _on_line(self, line: bytes) -> None:
        if not line or line.isspace():
            return
        try:
            parsed = parse_message(line)
        except CorralError as exc:
            await self._send(encode_error(None, exc))
            return
        if isinstance(parsed, list):
            await self._start_batch(parsed)
            return
        reply = self._admit(parsed, self._respond_for(parsed))
        if reply is not None:
            await self._send(reply)

    def _respond_for(self, request: ParsedItem) -> _Respond:
        if isinstance(request, Request) and request.is_notification:
            async def ignore(_: bytes) -> None:
                await trio.lowlevel.checkpoint()

            return ignore
        return self._send

    def _admit(self, item: ParsedItem, respond: _Respond) -> bytes | None:
        """Answer `item` now or start its task; returns an answer to send now, if any.

        Never waits, so a batch admits all its members before any of them runs.
        """
        if isinstance(item, InvalidItem):
            return encode_error(item.id, item.error)
        rid = _reply_id(item)
        try:
            method = Method(item.method)
        except ValueError:
            return _unless_notification(item, encode_error(rid, EngineClientError(
                Code.METHOD_NOT_FOUND, f"method not found: {item.method!r}",
                {"method": item.method})))
        inline = self._inline.get(method)
        if inline is not None:
            try:
                result = inline(item)
            except CorralError as exc:
                return _unless_notification(item, encode_error(rid, exc))
            return _unless_notification(item, encode_result(rid, result))
        if self._pending >= self._max_pending:
            return _unless_notification(item, encode_error(rid, OverloadedError(
                f"this connection has {self._pending} requests pending, the most allowed",
                self._retry_after_ms, {"max_pending_per_connection": self._max_pending})))
        streaming = method in _STREAM_METHODS
        if streaming and self._open_streams >= self._max_streams:
            return _unless_notification(item, encode_error(rid, OverloadedError(
                f"this connection has {self._open_streams} streams open, the most allowed",
                self._retry_after_ms, {"max_streams_per_connection": self._max_streams})))
        self._pending += 1
        if streaming:
            self._open_streams += 1
        assert self._tasks is not None
        self._tasks.start_soon(self._serve, item, method, respond)
        return None

    async def _start_batch(self, items: list[ParsedItem]) -> None:
        batch = _Batch(len(items))
        for index, item in enumerate(items):
            if isinstance(item, Request) and item.is_notification:
                batch.answer(index, None)
                self._admit(item, self._respond_for(item))
                continue
            reply = self._admit(item, batch.responder(index))
            if reply is not None:
                batch.answer(index, reply)
        if batch.complete.is_set():
            await self._send_batch(batch)  # the reader waits, as for any answer it sends
        else:
            # Some member runs; it holds a pending slot, which bounds these tasks.
            assert self._tasks is not None
            self._tasks.start_soon(self._send_batch, batch)

    async def _send_batch(self, batch: _Batch) -> None:
        await batch.complete.wait()
        replies = [reply for reply in batch.replies if reply is not None]
        if replies:  # a batch of notifications only gets no reply at all
            await self._send(encode_batch(replies))
        batch.sent.set()

    async def _serve(self, request: Request, method: Method, respond: _Respond) -> None:
        rid = _reply_id(request)
        try:
            result = await self._methods[method](request, respond)
        except CorralError as exc:
            await respond(encode_error(rid, exc))
        except Exception as exc:
            # A bug, not bad input: answer, then crash this connection (let it crash).
            await respond(encode_error(rid, EngineClientError(
                Code.INTERNAL_ERROR, f"internal error in {method.value}: {exc!r}")))
            raise
        else:
            if result is not _STREAMING:
                await respond(encode_result(rid, result))
        finally:
            self._pending -= 1
            if method in _STREAM_METHODS:
                self._open_streams -= 1

    # -- methods ---------------------------------------------------------------------

    async def _runtime_info(self, request: Request, _: _Respond) -> Any:
        params_as(request, _NoParams)
        return self._listener._info()

    async def _runtime_state(self, request: Request, _: _Respond) -> Any:
        params_as(request, _NoParams)
        return await self._runtime.statistics()

    async def _health(self, request: Request, _: _Respond) -> Any:
        params_as(request, _NoParams)
        return self._runtime.health()

    async def _list_models(self, request: Request, _: _Respond) -> Any:
        params_as(request, _NoParams)
        return self._runtime.list_models()

    async def _load_model(self, request: Request, _: _Respond) -> Any:
        params = params_as(request, _LoadModelParams)
        return await self._runtime.load_model(params.path, alias=params.alias,
                                              fallbacks=tuple(params.fallbacks))

    async def _unload_model(self, request: Request, _: _Respond) -> Any:
        params = params_as(request, _UnloadModelParams)
        await self._runtime.unload_model(params.alias)
        return {"alias": params.alias, "unloaded": True}

    async def _tokenize(self, request: Request, _: _Respond) -> Any:
        params = params_as(request, _TokenizeParams)
        ids = await self._runtime.tokenize(params.model, params.text,
                                           add_special_tokens=params.add_special_tokens)
        return {"token_ids": ids}

    async def _detokenize(self, request: Request, _: _Respond) -> Any:
        params = params_as(request, _DetokenizeParams)
        return {"text": await self._runtime.detokenize(params.model, params.token_ids)}

    def _generate_params(self, request: Request) -> dict[str, Any]:
        """The runtime's arguments: the params, with this connection as their client."""
        params = msgspec.structs.replace(params_as(request, GenerateParams),
                                         client=self._client)
        return dict(msgspec.to_builtins(params))

    async def _complete(self, request: Request, _: _Respond) -> Any:
        completion = await self._runtime.complete(**self._generate_params(request))
        return {**msgspec.to_builtins(completion), "usage": _usage(completion.usage)}

    async def _generate(self, request: Request, respond: _Respond) -> _Streaming:
        """Answer with the stream id, then send the stream as notifications.

        `cancel` or leaving ends the `generate` block, which drops the sequence from the
        batch at the next engine step.
        """
        async with self._runtime.generate(**self._generate_params(request)) as stream:
            sid = stream.stream_id
            self._unended.add(sid)
            await respond(encode_result(_reply_id(request),
                                        {"stream_id": sid, "model": stream.model}))
            with trio.CancelScope() as cancelled:
                self._streams[sid] = cancelled
                try:
                    await self._forward(stream)
                finally:
                    self._streams.pop(sid, None)
        if cancelled.cancelled_caught:
            await self._notify(Notification.STREAM_END, {
                "stream_id": sid, "finish_reason": "cancelled", "usage": _usage(stream.usage)})
        self._unended.discard(sid)
        return _STREAMING

    async def _forward(self, stream: TokenStream) -> None:
        """Send the chunks, then stream.end or stream.error."""
        sid = stream.stream_id
        try:
            async for chunk in stream:
                params: dict[str, Any] = {"stream_id": sid, "text": chunk.text,
                                          "token_ids": chunk.token_ids, "index": chunk.index}
                if chunk.logprobs is not None:
                    params["logprobs"] = chunk.logprobs
                await self._notify(Notification.STREAM_CHUNK, params)
        except CorralError as exc:
            end = encode_notification(Notification.STREAM_ERROR,
                                      {"stream_id": sid, "error": _error_object(exc)})
        else:
            end = encode_notification(Notification.STREAM_END, {
                "stream_id": sid, "finish_reason": stream.finish_reason,
                "usage": _usage(stream.usage)})
        # Out of reach of `cancel` from here on: one terminal notification at most.
        del self._streams[sid]
        await self._send(end)
        self._unended.discard(sid)

    def _cancel(self, request: Request) -> Any:
        stream_id = params_as(request, _CancelParams).stream_id
        scope = self._streams.get(stream_id)
        if scope is not None:
            scope.cancel()
        return {"stream_id": stream_id, "cancelled": scope is not None}

    def _shutdown(self, request: Request) -> Any:
        params_as(request, _NoParams)
        self._listener._request_shutdown()
        return {"shutdown": True}


def _reply_id(request: Request) -> RequestId:
    return None if isinstance(request.id, msgspec.UnsetType) else request.id


def _unless_notification(item: Request, reply: bytes) -> bytes | None:
    return None if item.is_notification else reply


def _usage(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _error_object(error: CorralError) -> Any:
    """The `error` member of an error reply, for a stream.error notification."""
    return msgspec.json.decode(encode_error(None, error), type=ErrorResponse).error
