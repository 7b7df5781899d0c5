"""The actor: a base class whose loop takes, decodes, handles and answers one message at
a time, until stopped or crashed.

Nothing else touches an actor's state. A message that does not decode is a client error
for its sender, never a crash of the receiver; any other error but a typed one crashes
the actor, and its supervisor decides. This module knows nothing of models, transports
or supervision strategies.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, TypeVar

import msgspec
import trio

from corral.actors.context import Context
from corral.actors.mailbox import Reply
from corral.protocol.codec import Decoder
from corral.protocol.errors import Code, CorralError, EngineClientError

M = TypeVar("M")

_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


class Actor(Generic[M]):
    """Base class of actors: subclasses set `Message` and implement `handle`.

    `handle(message)` returns the answer for an `ask` (ignored for a `tell`). It may be a
    plain `def` when it never waits (a pure state update): the loop then skips a
    coroutine per message. Raising a
    `CorralError` answers the caller with that typed error and the actor goes on;
    raising anything else crashes the actor (let it crash): its supervisor decides.
    `defer_reply()` takes the answer slot of the current message for answering later.

    Hooks: `on_start` runs before the actor is reported started (a crash there is a
    start failure); `on_stop` runs on a graceful stop only, never after a crash or kill;
    `on_exit` (synchronous, so it runs even under cancellation) runs after every exit.
    `start_soon` runs a background task of this incarnation (a timer, a load): it is
    cancelled when the incarnation ends, and if it raises, the actor crashes with it.
    """

    Message: ClassVar[Any]
    keeps_tells_across_restarts: ClassVar[bool] = False
    """Set where a tell is a fact the next incarnation must still learn (tokens on
    their way to the stream registry), not a request to the dead one."""
    _decoders: ClassVar[dict[type, Decoder[Any]]] = {}

    ctx: Context
    _reply: Reply | None = None
    _idle: bool = False
    _nursery: trio.Nursery | None = None

    async def on_start(self) -> None:
        """Initialise state; the actor is not reachable-as-running until this returns."""

    async def handle(self, message: M) -> Any:
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Release resources on a graceful stop."""

    def on_exit(self) -> None:
        """Release what must never leak (threads, processes), after any kind of exit."""

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run `fn(*args)` in the background for the life of this incarnation."""
        assert self._nursery is not None, "start_soon is available from on_start on"
        self._nursery.start_soon(fn, *args)

    def defer_reply(self) -> Reply | None:
        """Take the current message's answer slot (None for a tell); answer it later."""
        reply, self._reply = self._reply, None
        return reply

    def _wake(self) -> None:
        # An idle actor sits in receive(); a sentinel wakes it to see the stop flag.
        # Idle means the buffer is empty, so send_nowait cannot fail for want of room.
        if self._idle:
            with contextlib.suppress(trio.WouldBlock):
                self.ctx.mailbox.enqueue_nowait((None, None))

    @classmethod
    def _decoder(cls) -> Decoder[Any]:
        decoder = Actor._decoders.get(cls)
        if decoder is None:
            decoder = Actor._decoders[cls] = Decoder(cls.Message)
        return decoder

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The actor loop: take, decode, handle, answer; until stopped or crashed.

        Drains with `receive_nowait` and checkpoints every `fairness_interval` messages
        so a busy actor never starves its neighbours.
        """
        self.ctx = ctx
        ctx.mailbox.keep_tells = self.keeps_tells_across_restarts
        ctx.on_stop_requested(self._wake)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.on_start()
                ctx.mailbox.mark_running()
                task_status.started()
                await self._loop(ctx)
                await self.on_stop()
                nursery.cancel_scope.cancel()
        finally:
            self.on_exit()

    async def _loop(self, ctx: Context) -> None:
        mailbox = ctx.mailbox
        receive_nowait = mailbox.receive_nowait
        decode = self._decoder().decode_unchecked
        handle = self.handle
        handle_is_async = inspect.iscoroutinefunction(handle)
        fairness = ctx.system.fairness_interval
        burst = 0
        while not ctx.stop_requested:
            if burst >= fairness:
                # Checkpoint before taking the next message, never while holding one.
                burst = 0
                await trio.lowlevel.checkpoint()
                continue
            try:
                payload, reply = receive_nowait()
                burst += 1
            except trio.WouldBlock:
                self._idle = True
                payload, reply = await mailbox.receive()
                self._idle = False
                burst = 0
            if payload is None:
                continue
            mailbox.messages_in += 1
            try:
                message = decode(payload)
            except _DECODE_ERRORS as exc:
                mailbox.decode_errors += 1
                ctx.log.warning("actor.undecodable_message", error=str(exc))
                if reply is not None:
                    reply.fail(EngineClientError(
                        Code.INVALID_REQUEST, f"{ctx.path} cannot decode the message: {exc}",
                        {"path": ctx.path}))
                continue
            self._reply = reply
            try:
                result = await handle(message) if handle_is_async else handle(message)
            except CorralError as exc:
                if self._reply is not None:
                    self._reply.fail(exc)
                else:
                    ctx.log.warning("actor.error_for_tell", error=repr(exc))
                continue
            if self._reply is not None:
                self._reply.send(result)
