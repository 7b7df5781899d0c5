"""One JSON-RPC 2.0 connection: newline framing, one writer, dispatch, batches and the
per-connection limits.

A `Connection` is the supervised child that serves one accepted stream. It frames lines,
answers what it cannot parse with a typed error and keeps the connection, runs each
request in its own task, and sends every reply and notification through one writer
task, so lines never interleave. What a method does is its `Session`'s business: this
module never touches the runtime, and never invents an error number (envelopes and
numbers come from `protocol/jsonrpc.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, TypeAlias, final

import msgspec
import trio

from corral.actors.context import Context
from corral.protocol.errors import Code, CorralError, EngineClientError, OverloadedError
from corral.protocol.jsonrpc import (
    InvalidItem,
    Method,
    ParsedItem,
    Request,
    RequestId,
    encode_batch,
    encode_error,
    encode_result,
    parse_message,
)
from corral.protocol.lifecycle import innermost

__all__ = ["ANSWERED", "Answered", "Call", "Connection", "ConnectionLimits", "InlineCall",
           "Respond", "Session", "SessionFactory", "reply_id"]

_RECEIVE_BYTES: Final = 65536
_QUEUED_LINES: Final = 64  # lines waiting for the writer before senders wait
_LINES_PER_WRITE: Final = 64
_STREAM_METHODS: Final = frozenset({Method.GENERATE, Method.COMPLETE})

Respond: TypeAlias = Callable[[bytes], Awaitable[None]]
"""Sends one encoded line (a reply, or a notification) to the peer."""
Call: TypeAlias = Callable[[Request, Respond], Awaitable[Any]]
"""A method run as a task: returns its result, or `ANSWERED`; raises a CorralError to
answer with it."""
InlineCall: TypeAlias = Callable[[Request], Any]
"""A method answered at once, by the reader, without a pending slot."""


@final
class Answered:
    """The result of a method that answered its request itself (a generate stream)."""


ANSWERED: Final = Answered()


class Session(Protocol):
    """The methods one connection serves, and the streams they keep open."""

    @property
    def calls(self) -> Mapping[Method, Call]: ...

    @property
    def inline(self) -> Mapping[Method, InlineCall]: ...

    async def end_streams(self, cause: BaseException) -> None:
        """The connection crashed (`cause`): end every stream the client was told of
        with a notification of its own, rather than in silence."""
        ...


class SessionFactory(Protocol):
    """Makes a connection's session once it runs: `send` queues a line for the writer;
    `client` (the connection's actor path) names the connection for fair admission."""

    def __call__(self, send: Respond, client: str) -> Session: ...


class ConnectionLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one connection may hold.

    Attributes:
        max_line_bytes: a longer line is answered InvalidRequest and skipped.
        max_pending: requests running at once (a generate counts until its stream ends).
        max_streams: of those, `generate` and `complete` calls.
        retry_after_ms: the wait an Overloaded answer tells.
        shutdown_timeout_ms: how long a stopping or crashing connection may take to
            flush its replies.
    """

    max_line_bytes: int
    max_pending: int
    max_streams: int
    retry_after_ms: int
    shutdown_timeout_ms: int


@final
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

    def responder(self, index: int) -> Respond:
        async def respond(reply: bytes) -> None:
            if self.replies[index] is None:
                self.answer(index, reply)
            await self.sent.wait()

        return respond


@final
class Connection:
    """Serves one connection until it closes, crashes or is stopped.

    Reading: lines longer than `limits.max_line_bytes` are answered with InvalidRequest
    (id null) and skipped up to their newline; every other line is parsed and each
    request starts a task, at most `limits.max_pending` at once (a generate counts until
    its stream ends), and of those at most `limits.max_streams` generate or complete
    calls; beyond either a request gets Overloaded. Inline methods (`cancel`,
    `shutdown`) are answered at once and need no slot, so a client can always free its
    slots. Bytes left without a newline at the end of input are a cut frame: ParseError.

    Closing: at the end of input or a failed write the peer is gone, and its requests
    and streams are cancelled at once; with `answer_after_eof` (stdio) the end of input
    only means no more requests (`printf ... | corral serve --jsonrpc stdio`), so what
    was read is answered first. On a stop request reading ends, running requests
    finish (bounded by the handler's shutdown timeout) and queued replies are flushed.
    A bug in one request (an exception that is not a CorralError) answers it with
    InternalError, ends every other stream of the connection (`Session.end_streams`),
    and crashes the connection, which is never restarted.
    """

    def __init__(self, stream: trio.abc.Stream, make_session: SessionFactory,
                 limits: ConnectionLimits, *, answer_after_eof: bool = False) -> None:
        self._stream = stream
        self._make_session = make_session
        self._limits = limits
        self._answer_after_eof = answer_after_eof
        self._flush_timeout = limits.shutdown_timeout_ms / 1000.0
        self._pending = 0
        self._open_streams = 0  # generate and complete calls running
        self._session: Session | None = None
        self._out: trio.MemorySendChannel[bytes] | None = None
        self._tasks: trio.Nursery | None = None
        self._scope = trio.CancelScope()

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the peer is gone or a stop is requested; the stream is closed
        when this returns, however it returns.

        Raises:
            Exception: what a request's bug raised, once every stream of the connection
                has had its stream.error (within the shutdown timeout).
        """
        log = ctx.log
        send, receive = trio.open_memory_channel[bytes](_QUEUED_LINES)
        self._out = send
        self._session = session = self._make_session(self._send, ctx.path)
        flushed = trio.Event()
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
                            await session.end_streams(innermost(exc))
                            await send.aclose()
                            await flushed.wait()
                        raise
                    with trio.move_on_after(self._flush_timeout):
                        await send.aclose()
                        await flushed.wait()
                    connection.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(self._stream)
            log.debug("jsonrpc.connection_closed")

    # -- framing -------------------------------------------------------------------

    async def _read(self) -> None:
        """Read lines until the end of input (or the peer is gone)."""
        max_line = self._limits.max_line_bytes
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
                if len(line) > max_line:
                    await self._too_long()
                else:
                    await self._on_line(line)
            del buffer[:start]
            searched = len(buffer)
            if len(buffer) > max_line:
                await self._too_long()
                buffer.clear()
                searched = 0
                discarding = True

    async def _too_long(self) -> None:
        max_line = self._limits.max_line_bytes
        await self._send(encode_error(None, EngineClientError(
            Code.INVALID_REQUEST, f"line too long: over {max_line} bytes",
            {"max_line_bytes": max_line})))

    async def _send(self, line: bytes) -> None:
        assert self._out is not None
        await self._out.send(line)

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

    def _respond_for(self, request: ParsedItem) -> Respond:
        if isinstance(request, Request) and request.is_notification:
            async def ignore(_: bytes) -> None:
                await trio.lowlevel.checkpoint()

            return ignore
        return self._send

    def _admit(self, item: ParsedItem, respond: Respond) -> bytes | None:
        """Answer `item` now or start its task; returns an answer to send now, if any.

        Never waits, so a batch admits all its members before any of them runs.
        """
        if isinstance(item, InvalidItem):
            return encode_error(item.id, item.error)
        assert self._session is not None
        rid = reply_id(item)
        try:
            method = Method(item.method)
        except ValueError:
            return _unless_notification(item, encode_error(rid, EngineClientError(
                Code.METHOD_NOT_FOUND, f"method not found: {item.method!r}",
                {"method": item.method})))
        inline = self._session.inline.get(method)
        if inline is not None:
            try:
                result = inline(item)
            except CorralError as exc:
                return _unless_notification(item, encode_error(rid, exc))
            return _unless_notification(item, encode_result(rid, result))
        limits = self._limits
        if self._pending >= limits.max_pending:
            return _unless_notification(item, encode_error(rid, OverloadedError(
                f"this connection has {self._pending} requests pending, the most allowed",
                limits.retry_after_ms, {"max_pending_per_connection": limits.max_pending})))
        streaming = method in _STREAM_METHODS
        if streaming and self._open_streams >= limits.max_streams:
            return _unless_notification(item, encode_error(rid, OverloadedError(
                f"this connection has {self._open_streams} streams open, the most allowed",
                limits.retry_after_ms, {"max_streams_per_connection": limits.max_streams})))
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

    async def _serve(self, request: Request, method: Method, respond: Respond) -> None:
        assert self._session is not None
        rid = reply_id(request)
        try:
            result = await self._session.calls[method](request, respond)
        except CorralError as exc:
            await respond(encode_error(rid, exc))
        except Exception as exc:
            # A bug, not bad input: answer, then crash this connection (let it crash).
            await respond(encode_error(rid, EngineClientError(
                Code.INTERNAL_ERROR, f"internal error in {method.value}: {exc!r}")))
            raise
        else:
            if result is not ANSWERED:
                await respond(encode_result(rid, result))
        finally:
            self._pending -= 1
            if method in _STREAM_METHODS:
                self._open_streams -= 1


def reply_id(request: Request) -> RequestId:
    """The id a reply to `request` carries: its id, or null for a notification."""
    return None if isinstance(request.id, msgspec.UnsetType) else request.id


def _unless_notification(item: Request, reply: bytes) -> bytes | None:
    return None if item.is_notification else reply
