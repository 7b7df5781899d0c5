"""The address of an actor path: `tell` and `ask`, stable across restarts.

An `ActorRef` encodes each message on send, so the receiver never shares an object with
its sender, and decodes an answer as the type the message names. It never touches an
actor's state; a dead or restarting actor is a typed error, never a hang.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, final, overload

import msgspec
import trio

from corral.actors.mailbox import ActorStatistics, Mailbox, MailboxState, Reply
from corral.protocol.codec import Decoder, encode
from corral.protocol.errors import TimeoutError
from corral.protocol.lifecycle import ExitReason

R = TypeVar("R")
ReplyT = TypeVar("ReplyT", covariant=True)


class Asks(Protocol[ReplyT]):
    """A message that expects an answer: its class names the answer's type."""

    @property
    def reply_type(self) -> type[ReplyT]: ...


_reply_decoders: dict[Any, Decoder[Any]] = {}


def _reply_decoder(reply_type: Any) -> Decoder[Any]:
    decoder = _reply_decoders.get(reply_type)
    if decoder is None:
        decoder = _reply_decoders[reply_type] = Decoder(reply_type)
    return decoder


@final
class ActorRef:
    """The address of an actor path: stable across restarts, cheap to copy.

    `tell` is fire-and-forget; `ask` waits for the answer. Messages are encoded on send,
    so the receiver never shares an object with the sender.
    """

    __slots__ = ("_default_timeout", "_mailbox", "_send_nowait", "path")

    def __init__(self, mailbox: Mailbox, default_timeout: float) -> None:
        self._mailbox = mailbox
        self._send_nowait = mailbox.enqueue_nowait  # the fast path, bound once
        self._default_timeout = default_timeout
        self.path = mailbox.path

    def __repr__(self) -> str:
        return f"ActorRef({self.path!r})"

    async def tell(self, message: Any) -> None:
        """Send `message` without waiting for an answer.

        Waits only while the running actor's mailbox is full (backpressure); a checkpoint
        only on that slow path. Cancellation while waiting sends nothing.

        Raises:
            ActorExitedError: the path is stopped.
            OverloadedError: the actor is restarting and its stash is full.
        """
        if self._mailbox.state is MailboxState.RUNNING:
            try:
                self._send_nowait((encode(message), None))
                return
            except trio.WouldBlock:
                pass
        await self._mailbox.put((encode(message), None))

    def tell_nowait(self, message: Any) -> None:
        """Like `tell`, but raises OverloadedError instead of waiting on a full mailbox."""
        self._mailbox.put_nowait((encode(message), None))

    async def tell_raw(self, payload: bytes) -> None:
        """Send bytes already encoded (from a pipe or socket); decoding is the receiver's."""
        await self._mailbox.put((payload, None))

    @overload
    async def ask(self, message: Asks[R], *, timeout: float | None = None,
                  request_id: str | int | None = None) -> R: ...

    @overload
    async def ask(self, message: msgspec.Struct, *, timeout: float | None = None,
                  request_id: str | int | None = None) -> None: ...

    async def ask(self, message: Any, *, timeout: float | None = None,
                  request_id: str | int | None = None) -> Any:
        """Send `message` and wait for the answer, decoded as `message.reply_type`
        (typed as that: `await ref.ask(Ping())` is a `Pong`, as msgspec's `Decoder[T]`
        decodes a `T`).

        Args:
            message: a Struct the actor accepts.
            timeout: seconds; defaults to the system's `calls.default_timeout_ms`.
            request_id: carried into a TimeoutError, for the caller's logs.

        Returns:
            The decoded answer (None for a message with no `reply_type`).

        Raises:
            TimeoutError: no answer within `timeout` (method = the message type).
            ActorExitedError: the actor exited (or was stopped) before answering; raised as
                soon as it exits, not at the timeout.
            OverloadedError: the mailbox or restart stash is full.
            CorralError: whatever typed error the actor answered with.

        Cancellation abandons the answer; the actor may still handle the message.
        """
        return await self.ask_raw(encode(message), getattr(message, "reply_type", None),
                                  method=type(message).__name__, timeout=timeout,
                                  request_id=request_id)

    async def ask_raw(self, payload: bytes, reply_type: Any, *, method: str,
                      timeout: float | None = None,
                      request_id: str | int | None = None) -> Any:
        """`ask` with a payload already encoded; see `ask`."""
        reply = Reply(self._mailbox)
        limit = self._default_timeout if timeout is None else timeout
        started = trio.current_time()
        try:
            # The deadline also covers waiting for room in a full mailbox.
            with trio.move_on_after(limit):
                await self._mailbox.put((payload, reply))
                if not reply.done:
                    await reply.wait()
        finally:
            self._mailbox.abandon(reply)
        if not reply.done:
            raise TimeoutError(method, limit, request_id, trio.current_time() - started)
        if reply.error is not None:
            raise reply.error
        if reply_type is None:
            return None
        assert reply.payload is not None
        return _reply_decoder(reply_type).decode(reply.payload)

    async def wait_exit(self) -> ExitReason:
        """Wait until the actor's current incarnation exits; return why."""
        return await self._mailbox.wait_exit()

    def statistics(self) -> ActorStatistics:
        return self._mailbox.statistics()
