"""A stream read from asyncio: the trio stream (one generation, or the `n` choices of
one request) handed over chunk by chunk, at most a chunk or two ahead of the reader.

Output waiting for a slow reader coalesces in the runtime, as with the trio facade; the
stream never blocks the loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, NoReturn, Self, TypeVar, final

import trio

from corral.aio.bridge import CLOSED, OUTPUT, Bridge, TrioTask, complete, resolve
from corral.protocol.messages import FinishReason, GenerateParams, ToolCall, Usage
from corral.runtime import ChoiceStreams as TrioChoiceStreams
from corral.runtime import Runtime as TrioRuntime
from corral.runtime import TokenStream as TrioTokenStream
from corral.runtime.stream_buffers import StreamChunk

__all__ = ["ChoiceStreams", "TokenStream"]

S = TypeVar("S", TrioTokenStream, TrioChoiceStreams)


class _Stream(Generic[S]):
    """What both streams share: opening the trio stream in a trio task, handing its
    chunks to asyncio, closing it. `open` opens the trio stream (a method of the trio
    facade, bound to its arguments).

    Reading raises what the trio stream raises (TimeoutError, GenerationError with the
    partial text, Cancelled for an idle reader...). One task reads a stream at a time.

    The trio side reads the runtime's stream and holds what it read in a queue of its
    own until this reader takes it: when a read is waiting it hands the chunk over and
    reads on, else it waits for the reader to empty the queue. So output waiting for a
    slow reader coalesces in the runtime (nothing lost, memory bounded by max_tokens),
    and an idle reader is noticed there, as with the trio facade, a chunk later at most.
    """

    def __init__(self, bridge: Bridge,
                 open_stream: Callable[[TrioRuntime], AbstractAsyncContextManager[S]]) -> None:
        self._bridge = bridge
        self._open_stream: Callable[[TrioRuntime], AbstractAsyncContextManager[S]] = open_stream
        self._task: TrioTask | None = None
        self._stream: S | None = None
        self._read: asyncio.Future[Any] | None = None  # the pending read, if any
        self._ahead: deque[StreamChunk] = deque()  # read by trio, not taken by asyncio
        self._taken: trio.Event | None = None  # the trio side waits for output to go
        self._ended = False
        self._error: BaseException | object | None = None

    def _opened(self) -> S:
        if self._stream is None:
            raise RuntimeError("the stream is not open: use `async with rt.generate(...)`")
        return self._stream

    # -- opening and closing -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Admit the request and submit it to the model.

        Raises:
            EngineClientError: InvalidParams (naming the field), ModelNotLoaded.
            CircuitBreakerOpenError: the model's breaker is open and no fallback is.
            OverloadedError: the registry is full.
            TimeoutError: the deadline passed while waiting for admission.
        """
        if self._task is not None:
            raise RuntimeError("a stream is opened once")
        task = self._task = self._bridge.spawn(self._serve)
        try:
            value = await asyncio.shield(task.result)
        except asyncio.CancelledError:
            await self._bridge.cancel(task)
            raise
        if value is CLOSED:
            raise await self._bridge.wait_closed_error()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Leave the block: a generation still running is cancelled and leaves the batch
        at the next engine step. Waits, also when cancelled, until it has."""
        if self._task is not None:
            await self._bridge.cancel(self._task)

    # -- reading -----------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamChunk:
        """The next chunk, as the trio stream gave it.

        Cancellation loses nothing: output that arrives for a cancelled read waits for
        the next one.
        """
        self._opened()
        if self._read is not None:
            raise RuntimeError("another task is already reading this stream")
        chunk = self._take()
        if chunk is not None:
            return chunk
        if self._ended:
            await self._end_async()
        read = self._read = self._bridge.loop.create_future()
        try:
            # Cancelled after the trio side announced output, the read leaves that
            # output queued for the next one.
            answer = await read
        finally:
            self._read = None
        chunk = self._take() if answer is OUTPUT else None
        if chunk is None:
            await self._end_async()
        return chunk

    def _take(self) -> StreamChunk | None:
        """The oldest chunk the trio side read and asyncio has not taken; once none is
        left, the trio side may read on."""
        if not self._ahead:
            return None
        chunk = self._ahead.popleft()
        taken = self._taken
        if not self._ahead and taken is not None and not taken.is_set():
            self._bridge.run_sync_soon(taken.set)
        return chunk

    async def _end_async(self) -> NoReturn:
        if self._error is CLOSED:
            self._error = await self._bridge.wait_closed_error()
        self._end()

    def _end(self) -> NoReturn:
        if self._error is CLOSED:
            self._error = self._bridge.closed_error()
        if isinstance(self._error, BaseException):
            raise self._error
        raise StopAsyncIteration

    # -- trio side ---------------------------------------------------------------------

    async def _serve(self, runtime: TrioRuntime, task: TrioTask) -> None:
        try:
            async with self._open_stream(runtime) as stream:
                self._stream = stream
                resolve(task.result, None)
                await self._pump(stream)
        finally:
            if not self._ended:
                # Closed by its own block (an end, as in trio), or by the runtime stopping.
                self._finish(None if task.scope.cancel_called else CLOSED)

    async def _pump(self, stream: S) -> None:
        """Hand the trio stream's chunks to asyncio until it ends.

        A reader that keeps up has its next read waiting when the chunk comes, so it
        hears of it in the same trio tick, and asking costs it no wakeup of trio (which
        would go through guest mode's I/O thread). Only after running ahead of the
        reader does the trio side wait, for the reader to take what is held.
        """
        while True:
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                self._finish(None)
                return
            except Exception as exc:  # the asyncio reader raises it
                self._finish(exc)
                return
            self._ahead.append(chunk)
            read = self._read
            if read is not None and not read.done():
                read.set_result(OUTPUT)  # the reader takes it, and whatever follows it
                continue
            while self._ahead:
                self._taken = trio.Event()
                await self._taken.wait()

    def _finish(self, error: BaseException | object | None) -> None:
        """The end: None for a normal one, an error, or `CLOSED` (the runtime stopped)."""
        self._ended = True
        self._error = error
        read = self._read
        if read is not None and not read.done():
            complete(read, error)


@final
class TokenStream(_Stream[TrioTokenStream]):
    """One generation, read from asyncio: `async with rt.generate(...) as stream:
    async for chunk in stream`.

    After the loop, `finish_reason`, `usage`, `text` and `token_ids` describe the whole
    completion (plain reads of the trio stream: the loops share a thread).
    """

    @property
    def stream_id(self) -> int:
        return self._opened().stream_id

    @property
    def model(self) -> str:
        return self._opened().model

    @property
    def fallback(self) -> str | None:
        """What served the request in place of the model asked for, if anything."""
        return self._opened().fallback

    @property
    def text(self) -> str:
        return self._opened().text

    @property
    def token_ids(self) -> list[int]:
        return self._opened().token_ids

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._opened().tool_calls

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._opened().finish_reason

    @property
    def usage(self) -> Usage:
        return self._opened().usage

    @property
    def token_times(self) -> list[float]:
        """trio time at which each token reached the stream (for TTFT and ITL)."""
        return self._opened().token_times


@final
class ChoiceStreams(_Stream[TrioChoiceStreams]):
    """The `n` choices of one request, read from asyncio: `async with
    rt.generate_choices(..., n=3) as choices: async for chunk in choices`. Each chunk
    names its `choice`; the last chunk of each choice has no tokens and its
    `finish_reason` (see `corral.runtime.ChoiceStreams`).

    `streams` are the choices' own trio streams, to read (text, finish reason, usage of
    each) from this loop's thread, never to iterate.
    """

    @property
    def request(self) -> GenerateParams:
        return self._opened().request

    @property
    def streams(self) -> list[TrioTokenStream]:
        return self._opened().streams

    @property
    def stream_id(self) -> int:
        return self._opened().stream_id

    @property
    def model(self) -> str:
        return self._opened().model

    @property
    def fallback(self) -> str | None:
        return self._opened().fallback

    @property
    def usage(self) -> Usage:
        return self._opened().usage
