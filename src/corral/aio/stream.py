"""One generation read from asyncio: the trio stream pumped into a buffer of its own,
read by asyncio chunk by chunk.

Output waiting for a slow reader coalesces in the runtime, as with the trio facade; the
stream never blocks the loop.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Any, NoReturn, final

import trio

from corral.aio.bridge import CLOSED, OUTPUT, Bridge, TrioTask, complete, resolve
from corral.protocol.messages import FinishReason, TokenOut, Usage
from corral.runtime import Runtime as TrioRuntime
from corral.runtime import TokenStream as TrioTokenStream
from corral.runtime.stream_buffers import StreamBuffer, StreamChunk


@final
class TokenStream:
    """One generation, read from asyncio: `async with rt.generate(...) as stream:
    async for chunk in stream`.

    After the loop, `finish_reason`, `usage`, `text` and `token_ids` describe the whole
    completion. Reading raises what the trio stream raises (TimeoutError,
    GenerationError with the partial text, Cancelled for an idle reader...). One task
    reads a stream at a time.

    The trio side reads the runtime's stream into a `StreamBuffer` of its own, at most
    one chunk ahead of this reader, and then waits for it, so output waiting for a slow
    reader coalesces in the runtime (nothing lost, memory bounded by max_tokens) and an
    idle reader is noticed there, as with the trio facade, one chunk later at most.
    """

    def __init__(self, bridge: Bridge, model: str | None, prompt: str | list[int] | None,
                 params: dict[str, Any]) -> None:
        self._bridge = bridge
        self._request = (model, prompt, params)
        self._task: TrioTask | None = None
        self._stream: TrioTokenStream | None = None
        self._read: asyncio.Future[Any] | None = None  # the pending read, if any
        # Output the trio side read and asyncio has not taken yet (from the first chunk on).
        self._ahead: StreamBuffer | None = None
        self._taken: trio.Event | None = None  # the trio side waits for output to go
        self._ended = False
        self._error: BaseException | object | None = None

    # -- the completion so far (plain reads of the trio stream: same thread) ------------

    def _opened(self) -> TrioTokenStream:
        if self._stream is None:
            raise RuntimeError("the stream is not open: use `async with rt.generate(...)`")
        return self._stream

    @property
    def stream_id(self) -> int:
        return self._opened().stream_id

    @property
    def model(self) -> str:
        return self._opened().model

    @property
    def text(self) -> str:
        return self._opened().text

    @property
    def token_ids(self) -> list[int]:
        return self._opened().token_ids

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

    # -- opening and closing -----------------------------------------------------------

    async def __aenter__(self) -> TokenStream:
        """Admit the request and submit it to the model.

        Raises:
            EngineClientError: InvalidParams (naming the field), ModelNotLoaded.
            CircuitBreakerOpenError: the model's breaker is open and no fallback is.
            OverloadedError: the registry is full.
            TimeoutError: the deadline passed while waiting for admission.
        """
        if self._task is not None:
            raise RuntimeError("a TokenStream is opened once")
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

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> StreamChunk:
        """The output since the last read, as one chunk.

        Cancellation loses nothing: output that arrives for a cancelled read waits in
        the buffer for the next one.
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
            # output in the buffer for the next one.
            answer = await read
        finally:
            self._read = None
        chunk = self._take() if answer is OUTPUT else None
        if chunk is None:
            await self._end_async()
        return chunk

    def _take(self) -> StreamChunk | None:
        """Everything the trio side read and asyncio has not taken, as one chunk (the
        buffer coalesces, as the runtime's does); the trio side may read on."""
        chunk = self._ahead.take() if self._ahead is not None else None
        taken = self._taken
        if chunk is not None and taken is not None and not taken.is_set():
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
        model, prompt, params = self._request
        try:
            async with runtime.generate(model, prompt, **params) as stream:
                self._stream = stream
                resolve(task.result, None)
                await self._pump(stream)
        finally:
            if not self._ended:
                # Closed by its own block (an end, as in trio), or by the runtime stopping.
                self._finish(None if task.scope.cancel_called else CLOSED)

    async def _pump(self, stream: TrioTokenStream) -> None:
        """Hand the trio stream's chunks to asyncio until it ends, one chunk ahead.

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
            ahead = self._hold(stream, chunk)
            read = self._read
            if read is not None and not read.done():
                read.set_result(OUTPUT)  # the reader takes it, and whatever follows it
                continue
            while ahead.has_unread:
                self._taken = trio.Event()
                await self._taken.wait()

    def _hold(self, stream: TrioTokenStream, chunk: StreamChunk) -> StreamBuffer:
        """Add a chunk of the trio stream to the buffer, token by token; return it."""
        ahead = self._ahead
        if ahead is None:
            ahead = self._ahead = StreamBuffer(
                stream.stream_id, stream.model, request_id=None, timeout_s=math.inf,
                deadline=math.inf, prompt_tokens=0, logprobs=chunk.logprobs is not None,
                alternatives=chunk.top_logprobs is not None)
        for i, token in enumerate(chunk.token_ids):
            logprob = chunk.logprobs[i] if chunk.logprobs is not None else None
            ahead.push(TokenOut(
                stream.stream_id, token, chunk.text if i == 0 else "", logprob, None,
                piece=chunk.tokens[i] if chunk.tokens is not None else None,
                top_logprobs=chunk.top_logprobs[i] if chunk.top_logprobs is not None else None))
        return ahead

    def _finish(self, error: BaseException | object | None) -> None:
        """The end: None for a normal one, an error, or `CLOSED` (the runtime stopped)."""
        self._ended = True
        self._error = error
        read = self._read
        if read is not None and not read.done():
            complete(read, error)
