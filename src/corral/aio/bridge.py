"""The bridge between the loops: a trio guest run on the asyncio loop's thread, the trio
runtime inside it, and how a call or a task crosses from asyncio to trio and back.

Nothing crosses a thread: asyncio hands trio a callback (`TrioToken.run_sync_soon`), and
trio completes an asyncio future directly. Errors cross as the very exception objects
trio raised; cancelling the asyncio caller cancels its trio task. It never runs MLX and
never blocks the loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar, final

import outcome
import trio

from corral.config import RuntimeConfig
from corral.protocol.errors import CorralError
from corral.protocol.lifecycle import innermost
from corral.runtime import Runtime as TrioRuntime
from corral.runtime import open_runtime as open_trio_runtime
from corral.runtime import shutting_down_error

T = TypeVar("T")

__all__ = ["CLOSED", "OUTPUT", "Bridge", "TrioTask", "complete", "resolve", "settle"]

# What trio puts in a call's result future when the runtime stopped under the call; the
# asyncio side turns it into the runtime's failure or a shutting-down error.
CLOSED: Final = object()
# What trio puts in a stream's pending read when output waits in the stream's buffer.
OUTPUT: Final = object()


def resolve(future: asyncio.Future[Any], value: Any) -> None:
    """Resolve `future` with `value` unless it is done already."""
    if not future.done():
        future.set_result(value)


def complete(future: asyncio.Future[Any], value_or_error: Any) -> None:
    """Resolve `future` with a value, or fail it with an exception instance."""
    if future.done():
        return
    if isinstance(value_or_error, BaseException):
        future.set_exception(value_or_error)
    else:
        future.set_result(value_or_error)


async def settle(future: asyncio.Future[Any]) -> None:
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
class TrioTask:
    """One task the asyncio side started in the guest run.

    `result` gets the value or the exception (or `CLOSED`); `finished` is set when the
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
        resolve(self.result, CLOSED)
        resolve(self.finished, None)


@final
class Bridge:
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
        self._tasks: set[TrioTask] = set()
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
            await settle(self._done)
            raise
        except BaseException:
            await settle(self._done)
            raise
        if started is CLOSED:
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

    def spawn(self, fn: Callable[[TrioRuntime, TrioTask], Awaitable[Any]]) -> TrioTask:
        """Start `fn(runtime, task)` as a trio task; its value or error goes to
        `task.result`. Raises the closed error if the runtime is stopping."""
        if self._closing or self._done.done():
            raise self.closed_error()
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("a corral.aio runtime must be used from the loop that opened it")
        task = TrioTask(self.loop)
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
        if value is CLOSED:
            raise await self.wait_closed_error()
        return value  # type: ignore[no-any-return]

    async def cancel(self, task: TrioTask) -> None:
        """Cancel a trio task and wait, through any cancellation, until it has ended."""
        if not task.finished.done():
            self.run_sync_soon(task.scope.cancel)
        try:
            await settle(task.finished)
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
        await settle(self._done)
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
                resolve(self._started, None)
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

    def _start_in_trio(self, task: TrioTask,
                       fn: Callable[[TrioRuntime, TrioTask], Awaitable[Any]]) -> None:
        if not self._accepting or self._nursery is None or self._runtime is None:
            self._forget(task)
            return
        self._nursery.start_soon(self._run_task, task, fn, self._runtime)

    async def _run_task(self, task: TrioTask,
                        fn: Callable[[TrioRuntime, TrioTask], Awaitable[Any]],
                        runtime: TrioRuntime) -> None:
        try:
            with task.scope:
                try:
                    value = await fn(runtime, task)
                except Exception as exc:  # the asyncio caller raises it
                    # Raised while this task is being cancelled, it is about that (a
                    # retry aborted, say): the caller gets why, from the asyncio side.
                    cancelled = trio.current_effective_deadline() == -math.inf
                    complete(task.result, CLOSED if cancelled else exc)
                else:
                    resolve(task.result, value)
        finally:
            self._forget(task)

    def _forget(self, task: TrioTask) -> None:
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
                self._started.set_result(CLOSED)
        resolve(self._done, result)
