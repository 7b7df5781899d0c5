"""corral from asyncio: the trio runtime as a guest on the running asyncio loop.

`async with corral.aio.open_runtime(config) as rt` starts trio in guest mode
(`trio.lowlevel.start_guest_run`) on the asyncio loop's own thread, opens the trio facade
(`corral.runtime.open_runtime`) in it, and offers its operations as asyncio coroutines.
The two loops take turns on one thread, so nothing crosses a thread per call or per
token: asyncio hands trio a callback (`TrioToken.run_sync_soon`), and trio completes an
asyncio future directly. Errors cross as the very exception objects trio raised;
cancelling the asyncio caller cancels its trio task.

This module is a bridge and nothing more: it never runs MLX (each engine has its own
thread), never blocks the loop, and never does again what the trio facade does.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, NoReturn, TypeVar, final

import outcome
import trio

from corral.config import RuntimeConfig
from corral.protocol.errors import CorralError
from corral.protocol.lifecycle import innermost
from corral.protocol.messages import Completion, FinishReason, TokenOut, Usage
from corral.runtime import (
    Health,
    ModelDescription,
    ResilienceState,
    RuntimeStatistics,
    shutting_down_error,
)
from corral.runtime import Runtime as TrioRuntime
from corral.runtime import TokenStream as TrioTokenStream
from corral.runtime import open_runtime as open_trio_runtime
from corral.runtime.stream_buffers import StreamBuffer, StreamChunk

__all__ = ["Runtime", "TokenStream", "open_runtime"]

T = TypeVar("T")

# What trio puts in a call's result future when the runtime stopped under the call; the
# asyncio side turns it into the runtime's failure or a shutting-down error.
_CLOSED: Final = object()
# What trio puts in a stream's pending read when output waits in the stream's buffer.
_OUTPUT: Final = object()


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _complete(future: asyncio.Future[Any], value_or_error: Any) -> None:
    """Resolve `future` with a value, or fail it with an exception instance."""
    if future.done():
        return
    if isinstance(value_or_error, BaseException):
        future.set_exception(value_or_error)
    else:
        future.set_result(value_or_error)


async def _settle(future: asyncio.Future[Any]) -> None:
    """Wait until `future` is done, through any number of cancellations, then re-raise
    the cancellation if there was one. For waiting on trio cleanup, which is prompt
    and must not be abandoned: the loop would stop under a half-finished trio run."""
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait((future,))
        except asyncio.CancelledError as exc:
            cancelled = exc
    if not future.cancelled():
        future.exception()  # retrieved: whoever waits here no longer wants the result
    if cancelled is not None:
        raise cancelled


@final
class _TrioTask:
    """One task the asyncio side started in the guest run.

    `result` gets the value or the exception (or `_CLOSED`); `finished` is set when the
    trio task has ended and cleaned up. `scope` is entered by the trio task; asyncio
    cancels it only through the bridge (`run_sync_soon`), never directly.
    """

    __slots__ = ("finished", "result", "scope")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.result: asyncio.Future[Any] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.scope = trio.CancelScope()

    def close(self) -> None:
        """Resolve what is still pending: the trio task has ended, or the guest run."""
        _resolve(self.result, _CLOSED)
        _resolve(self.finished, None)


@final
class _Bridge:
    """The guest run on one asyncio loop and the trio runtime inside it.

    Only trio code (in the guest run) touches the trio runtime; only asyncio code awaits
    the futures. Both run on the loop's thread, one at a time.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._main_scope = trio.CancelScope()
        self._token: trio.lowlevel.TrioToken | None = None
        self._runtime: TrioRuntime | None = None
        self._nursery: trio.Nursery | None = None
        self._close_requested: trio.Event | None = None
        self._accepting = False  # trio side: new tasks may start
        self._closing = False  # asyncio side: the context is exiting
        self._tasks: set[_TrioTask] = set()
        self._started: asyncio.Future[Any] = loop.create_future()
        self._done: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
        self.failure: BaseException | None = None

    # -- asyncio side ------------------------------------------------------------------

    @property
    def runtime(self) -> TrioRuntime:
        assert self._runtime is not None
        return self._runtime

    async def start(self, config: RuntimeConfig | None,
                    models: Mapping[str, str] | None) -> None:
        if trio.lowlevel.in_trio_run():
            raise RuntimeError(
                "corral.aio.open_runtime: this thread already runs trio (another "
                "corral.aio runtime on this loop, or trio itself); open one runtime per "
                "loop and load every model into it")
        trio.lowlevel.start_guest_run(
            self._main, config, models,
            run_sync_soon_threadsafe=self.loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=self.loop.call_soon,
            done_callback=self._on_done,
            # asyncio owns signal.set_wakeup_fd (add_signal_handler); trio must not take it.
            host_uses_signal_set_wakeup_fd=True)
        self._token = self._token_now()
        try:
            started = await asyncio.shield(self._started)
        except asyncio.CancelledError:
            self.run_sync_soon(self._main_scope.cancel)
            await _settle(self._done)
            raise
        except BaseException:
            await _settle(self._done)
            raise
        if started is _CLOSED:
            raise self.closed_error()

    @staticmethod
    def _token_now() -> trio.lowlevel.TrioToken:
        # start_guest_run has set up the run on this thread: sync trio calls work here.
        return trio.lowlevel.current_trio_token()

    def run_sync_soon(self, fn: Callable[[], object]) -> bool:
        """Schedule `fn()` in the guest run; False when the run is already over."""
        if self._token is None or self._done.done():
            return False
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            return False
        return True

    def closed_error(self) -> BaseException:
        """What a call gets once the runtime has stopped under it."""
        if isinstance(self.failure, CorralError):
            return self.failure
        error = shutting_down_error("the runtime was closed")
        error.__cause__ = self.failure
        return error

    def spawn(self, fn: Callable[[TrioRuntime, _TrioTask], Awaitable[Any]]) -> _TrioTask:
        """Start `fn(runtime, task)` as a trio task; its value or error goes to
        `task.result`. Raises the closed error if the runtime is stopping."""
        if self._closing or self._done.done():
            raise self.closed_error()
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("a corral.aio runtime must be used from the loop that opened it")
        task = _TrioTask(self.loop)
        self._tasks.add(task)
        if not self.run_sync_soon(lambda: self._start_in_trio(task, fn)):
            task.close()
        return task

    async def call(self, fn: Callable[[TrioRuntime], Awaitable[T]]) -> T:
        """Run `fn(runtime)` in trio and return its value or raise its error.

        Cancelling the caller cancels the trio task and waits until it has finished.
        """
        task = self.spawn(lambda runtime, _: fn(runtime))
        try:
            value = await asyncio.shield(task.result)
        except asyncio.CancelledError:
            await self.cancel(task)
            raise
        if value is _CLOSED:
            raise await self.wait_closed_error()
        return value  # type: ignore[no-any-return]

    async def cancel(self, task: _TrioTask) -> None:
        """Cancel a trio task and wait, through any cancellation, until it has ended."""
        if not task.finished.done():
            self.run_sync_soon(task.scope.cancel)
        try:
            await _settle(task.finished)
        finally:
            if task.result.done() and not task.result.cancelled():
                task.result.exception()  # the canceller does not want it

    async def wait_closed_error(self) -> BaseException:
        """The closed error, once it is known: when the runtime stopped on its own (it
        failed), what it failed with is known only at the end of the guest run."""
        if not self._closing:
            await asyncio.wait((self._done,))
        return self.closed_error()

    async def aclose(self) -> None:
        """Stop the runtime: cancel every trio task still running, leave the trio
        facade's block, wait for the guest run to end. Re-raises a runtime failure."""
        self._closing = True
        self.run_sync_soon(self._request_close)
        await _settle(self._done)
        if self.failure is not None:
            raise self.failure

    # -- trio side ---------------------------------------------------------------------

    async def _main(self, config: RuntimeConfig | None,
                    models: Mapping[str, str] | None) -> None:
        with self._main_scope:
            async with (open_trio_runtime(config, models=models) as runtime,
                        trio.open_nursery() as nursery):
                self._runtime, self._nursery = runtime, nursery
                self._close_requested = trio.Event()
                self._accepting = True
                _resolve(self._started, None)
                try:
                    await self._close_requested.wait()
                finally:
                    self._accepting = False
                    nursery.cancel_scope.cancel()

    def _request_close(self) -> None:
        if self._close_requested is not None:
            self._close_requested.set()
        else:  # still starting
            self._main_scope.cancel()

    def _start_in_trio(self, task: _TrioTask,
                       fn: Callable[[TrioRuntime, _TrioTask], Awaitable[Any]]) -> None:
        if not self._accepting or self._nursery is None or self._runtime is None:
            self._forget(task)
            return
        self._nursery.start_soon(self._run_task, task, fn, self._runtime)

    async def _run_task(self, task: _TrioTask,
                        fn: Callable[[TrioRuntime, _TrioTask], Awaitable[Any]],
                        runtime: TrioRuntime) -> None:
        try:
            with task.scope:
                try:
                    value = await fn(runtime, task)
                except Exception as exc:  # the asyncio caller raises it
                    # Raised while this task is being cancelled, it is about that (a
                    # retry aborted, say): the caller gets why, from the asyncio side.
                    cancelled = trio.current_effective_deadline() == -math.inf
                    _complete(task.result, _CLOSED if cancelled else exc)
                else:
                    _resolve(task.result, value)
        finally:
            self._forget(task)

    def _forget(self, task: _TrioTask) -> None:
        self._tasks.discard(task)
        task.close()

    def _on_done(self, result: outcome.Outcome[None]) -> None:
        """The guest run is over (trio calls this from the loop's thread)."""
        if isinstance(result, outcome.Error):
            self.failure = innermost(result.error)
        for task in list(self._tasks):
            task.close()
        self._tasks.clear()
        if not self._started.done():
            if self.failure is not None:
                self._started.set_exception(self.failure)
                self._started.exception()  # start() re-raises it through the shield
            else:
                self._started.set_result(_CLOSED)
        _resolve(self._done, result)


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

    def __init__(self, bridge: _Bridge, model: str | None, prompt: str | list[int] | None,
                 params: dict[str, Any]) -> None:
        self._bridge = bridge
        self._request = (model, prompt, params)
        self._task: _TrioTask | None = None
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
        if value is _CLOSED:
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
        chunk = self._take() if answer is _OUTPUT else None
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
        if self._error is _CLOSED:
            self._error = await self._bridge.wait_closed_error()
        self._end()

    def _end(self) -> NoReturn:
        if self._error is _CLOSED:
            self._error = self._bridge.closed_error()
        if isinstance(self._error, BaseException):
            raise self._error
        raise StopAsyncIteration

    # -- trio side ---------------------------------------------------------------------

    async def _serve(self, runtime: TrioRuntime, task: _TrioTask) -> None:
        model, prompt, params = self._request
        try:
            async with runtime.generate(model, prompt, **params) as stream:
                self._stream = stream
                _resolve(task.result, None)
                await self._pump(stream)
        finally:
            if not self._ended:
                # Closed by its own block (an end, as in trio), or by the runtime stopping.
                self._finish(None if task.scope.cancel_called else _CLOSED)

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
                read.set_result(_OUTPUT)  # the reader takes it, and whatever follows it
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
        """The end: None for a normal one, an error, or `_CLOSED` (the runtime stopped)."""
        self._ended = True
        self._error = error
        read = self._read
        if read is not None and not read.done():
            _complete(read, error)


@final
class Runtime:
    """The trio facade's operations as asyncio coroutines. Made by `open_runtime`.

    Each call runs in the guest trio run on this loop's thread. Cancelling the calling
    task cancels the call in trio (a generation leaves the batch at the next engine
    step) and waits until it has. A failed call raises the exception the trio facade
    raised, as the same object. Once the runtime is closed or has failed, calls raise
    its failure (an EscalationError, say) or a retryable ServerError with
    `details["shutting_down"]`.
    """

    def __init__(self, bridge: _Bridge) -> None:
        self._bridge = bridge

    @property
    def config(self) -> RuntimeConfig:
        return self._bridge.runtime.config

    async def load_model(self, path: str, *, alias: str | None = None,
                         fallbacks: tuple[str, ...] = ()) -> ModelDescription:
        """See `corral.Runtime.load_model`."""
        return await self._bridge.call(
            lambda rt: rt.load_model(path, alias=alias, fallbacks=fallbacks))

    async def unload_model(self, alias: str) -> None:
        """See `corral.Runtime.unload_model`."""
        await self._bridge.call(lambda rt: rt.unload_model(alias))

    async def list_models(self) -> list[ModelDescription]:
        return await self._bridge.call(_sync(TrioRuntime.list_models))

    async def tokenize(self, model: str | None, text: str, *,
                       add_special_tokens: bool = True) -> list[int]:
        return await self._bridge.call(
            lambda rt: rt.tokenize(model, text, add_special_tokens=add_special_tokens))

    async def detokenize(self, model: str | None, ids: list[int]) -> str:
        return await self._bridge.call(lambda rt: rt.detokenize(model, ids))

    def generate(self, model: str | None = None, prompt: str | list[int] | None = None,
                 **params: Any) -> TokenStream:
        """Start a generation: `async with rt.generate(...) as stream: async for chunk
        in stream`. Arguments and errors are those of `corral.Runtime.generate`."""
        return TokenStream(self._bridge, model, prompt, params)

    async def complete(self, model: str | None = None, prompt: str | list[int] | None = None,
                       **params: Any) -> Completion:
        """Generate to the end in trio and return the whole completion (one crossing,
        not one per chunk); see `corral.Runtime.complete`."""
        return await self._bridge.call(lambda rt: rt.complete(model, prompt, **params))

    async def health(self) -> Health:
        return await self._bridge.call(_sync(TrioRuntime.health))

    async def statistics(self) -> RuntimeStatistics:
        return await self._bridge.call(lambda rt: rt.statistics())

    async def resilience(self) -> ResilienceState:
        """Rolling error metrics and breakers; see `corral.Runtime.resilience`."""
        return await self._bridge.call(_sync(TrioRuntime.resilience))

    async def run_in_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(trio_runtime, *args)` in the guest trio run: the way to reach
        the rest of the trio facade (`add_step_listener`, `drain`, `inject_fault`...).
        `fn` is trio code; cancellation and errors cross as for every other call."""
        return await self._bridge.call(lambda rt: fn(rt, *args))


def _sync(fn: Callable[[TrioRuntime], T]) -> Callable[[TrioRuntime], Awaitable[T]]:
    async def run(runtime: TrioRuntime) -> T:
        return fn(runtime)

    return run


@asynccontextmanager
async def open_runtime(config: RuntimeConfig | None = None, *,
                       models: Mapping[str, str] | None = None) -> AsyncIterator[Runtime]:
    """Run corral on the running asyncio loop, as `corral.open_runtime` runs it on trio.

    Starts a trio guest run on this loop's thread, opens the runtime in it and loads
    `config.generation.models` and `models` (alias → path). Leaving the block ends every
    generation still open (their readers get a retryable ServerError with
    `details["shutting_down"]`), stops the runtime gracefully and ends the guest run;
    it waits for that, also when cancelled (as when `asyncio.run` stops its loop and
    cancels the remaining tasks). Do not stop the loop by other means while the block
    is open: trio must run to its end.

    One runtime per event loop (trio runs once per thread); it serves several models.

    Raises:
        EngineClientError: ModelLoadError for a model that fails to load.
        EscalationError: the root gave up (restart intensity exceeded); raised from the
            block's exit, and from every call made after it happened.
        RuntimeError: trio already runs on this thread.
    """
    bridge = _Bridge(asyncio.get_running_loop())
    await bridge.start(config, models)
    try:
        yield Runtime(bridge)
    finally:
        await bridge.aclose()
