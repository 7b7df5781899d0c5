"""The mailbox of an actor path: its queue, its answer slots and its statistics.

A mailbox (a bounded trio memory channel carrying msgpack-encoded messages) belongs to a
path, not to one incarnation: it outlives restarts, stashes what arrives while its actor
restarts, and fails every waiting `ask` at once when the actor exits. It never decodes
a message and knows nothing of what its actor does.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, final

import msgspec
import trio

from corral.protocol.codec import encode
from corral.protocol.errors import ActorExitedError, OverloadedError
from corral.protocol.lifecycle import SHUTDOWN, ExitReason


class MailboxState(enum.StrEnum):
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPED = "stopped"


_RUNNING = MailboxState.RUNNING


class ActorStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one actor path.

    Attributes:
        path: the actor's path, e.g. ``root/generation/model:tiny``.
        state: running, restarting (messages are stashed) or stopped.
        messages_in: messages taken from the mailbox by any incarnation.
        replies_out: answers sent to `ask` callers (values and typed errors).
        decode_errors: messages that did not decode; their senders got InvalidRequest.
        dropped: tells discarded because the incarnation they were queued for exited.
        rejected: sends refused with a typed error (mailbox or stash full, or stopped).
        queue_depth: messages waiting in the mailbox now.
        pending_asks: callers waiting for an answer now.
        restarts: times a supervisor restarted this path.
        last_exit_reason: how the last incarnation ended, if one has.
        monitors: callbacks that will hear of the path's next exit.
    """

    path: str
    state: str
    messages_in: int
    replies_out: int
    decode_errors: int
    dropped: int
    rejected: int
    queue_depth: int
    pending_asks: int
    restarts: int
    last_exit_reason: str | None
    monitors: int = 0


@final
class Reply:
    """A one-shot answer slot for one `ask`.

    The first `send` or `fail` wins; later ones are ignored, so an actor answering a
    caller that already gave up (timeout, cancellation) is harmless.
    """

    __slots__ = ("_done", "_error", "_mailbox", "_payload")

    def __init__(self, mailbox: Mailbox) -> None:
        self._mailbox = mailbox
        self._done = trio.Event()
        self._payload: bytes | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def wanted(self) -> bool:
        """False once the caller stopped waiting (timeout, cancellation) or was answered."""
        return self in self._mailbox._pending

    @property
    def error(self) -> BaseException | None:
        """The typed error it was answered with, if any."""
        return self._error

    @property
    def payload(self) -> bytes | None:
        """The encoded answer, once answered with a value."""
        return self._payload

    async def wait(self) -> None:
        """Wait until it is answered (by a value or an error)."""
        await self._done.wait()

    def send(self, value: Any) -> None:
        """Answer with `value` (encoded now: the caller gets a copy, never a shared object)."""
        if self._done.is_set():
            return
        self._payload = encode(value)
        self._finish()

    def fail(self, error: BaseException) -> None:
        """Answer with a typed error, raised in the caller."""
        if self._done.is_set():
            return
        self._error = error
        self._finish()

    def _finish(self) -> None:
        self._mailbox._pending.discard(self)
        self._mailbox._replies_out += 1
        self._done.set()


# (payload, answer slot); a None payload is the wake-up sentinel of a stop request.
Envelope = tuple[bytes | None, Reply | None]


@final
class Mailbox:
    """The queue of one actor path, shared by all its incarnations.

    Running: sends queue up to `capacity`; `send` then waits, `send_nowait` raises
    OverloadedError. Restarting: sends are stashed up to `stash_limit`, beyond that they
    are rejected with OverloadedError (the overflow policy). Stopped: sends raise
    ActorExitedError with the last exit reason.
    """

    __slots__ = (
        "_dropped",
        "_exit_waiters",
        "_last_exit",
        "_monitors",
        "_pending",
        "_recv",
        "_rejected",
        "_replies_out",
        "_send",
        "decode_errors",
        "enqueue_nowait",
        "keep_tells",
        "messages_in",
        "path",
        "receive",
        "receive_nowait",
        "restarts",
        "stash_limit",
        "state",
    )

    def __init__(self, path: str, *, capacity: int, stash_limit: int) -> None:
        self.path = path
        self._send, self._recv = trio.open_memory_channel[Envelope](capacity)
        # The kernel's fast paths, bound once: the channel's own send_nowait (no state
        # check: for a running mailbox and the stop sentinel) and its receive side, which
        # only the running incarnation's loop reads.
        self.enqueue_nowait = self._send.send_nowait
        self.receive_nowait = self._recv.receive_nowait
        self.receive = self._recv.receive
        self.stash_limit = stash_limit
        self.state = MailboxState.RESTARTING
        self._pending: set[Reply] = set()
        self._exit_waiters: list[trio.Event] = []
        self._monitors: list[Callable[[ExitReason], None]] = []
        self.keep_tells = False
        self._last_exit: ExitReason | None = None
        self.restarts = 0
        self.messages_in = 0
        self._replies_out = 0
        self.decode_errors = 0
        self._dropped = 0
        self._rejected = 0

    def _admit(self) -> None:
        """Raise the typed error for a send that this mailbox's state refuses."""
        if self.state is MailboxState.RUNNING:
            return
        if self.state is MailboxState.STOPPED:
            self._rejected += 1
            reason = self._last_exit.describe() if self._last_exit else "not started"
            raise ActorExitedError(self.path, reason)
        if self._send.statistics().current_buffer_used >= self.stash_limit:
            self._rejected += 1
            raise OverloadedError(f"actor {self.path} is restarting and its stash is full",
                                  retry_after_ms=100, details={"path": self.path})

    def put_nowait(self, envelope: Envelope) -> None:
        self._admit()
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:
            self._rejected += 1
            raise OverloadedError(f"mailbox of {self.path} is full", retry_after_ms=10,
                                  details={"path": self.path}) from None

    async def put(self, envelope: Envelope) -> None:
        self._admit()
        if envelope[1] is not None:
            self._pending.add(envelope[1])
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:
            try:
                await self._send.send(envelope)
            except BaseException:
                if envelope[1] is not None:
                    self._pending.discard(envelope[1])
                raise

    def abandon(self, reply: Reply) -> None:
        """Forget `reply`: its caller stopped waiting (answered, timed out, cancelled)."""
        self._pending.discard(reply)

    # -- lifecycle, driven by the supervisor's child slot ---------------------------

    def mark_running(self) -> None:
        self.state = MailboxState.RUNNING

    def mark_exited(self, reason: ExitReason, *, restarting: bool) -> None:
        """Record an incarnation's exit and fail everyone who waits on it.

        Queued and in-flight asks fail at once with ActorExitedError (the monitor);
        queued tells were addressed to the dead incarnation and are dropped, counted,
        unless the actor keeps them (`keeps_tells_across_restarts`): then the next
        incarnation gets them, in order.
        With `restarting`, later sends are stashed for the next incarnation.
        """
        self._last_exit = reason
        self.state = MailboxState.RESTARTING if restarting else MailboxState.STOPPED
        error = ActorExitedError(self.path, reason.describe())
        kept: list[Envelope] = []
        while True:
            try:
                payload, reply = self._recv.receive_nowait()
            except trio.WouldBlock:
                break
            if reply is None and payload is not None:
                if restarting and self.keep_tells:
                    kept.append((payload, None))
                else:
                    self._dropped += 1
        for envelope in kept:  # room is certain: they were just taken out
            self._send.send_nowait(envelope)
        for reply in list(self._pending):
            reply.fail(error)
        waiters, self._exit_waiters = self._exit_waiters, []
        for event in waiters:
            event.set()
        for monitor in list(self._monitors):
            monitor(reason)

    def add_monitor(self, callback: Callable[[ExitReason], None]) -> Callable[[], None]:
        """Call `callback(reason)` at every exit of this path (an Erlang monitor that
        outlives restarts). The callback must not block; it usually tells an actor.
        Returns a function that removes the monitor.
        """
        self._monitors.append(callback)
        return lambda: self._monitors.remove(callback)

    def stop(self) -> None:
        """Stop the path for good: pending asks fail, later sends raise ActorExitedError.

        A running incarnation stopped this way ends by shutdown; a path between two
        incarnations keeps the reason its last one exited with.
        """
        if self.state is MailboxState.RUNNING:
            self.mark_exited(SHUTDOWN, restarting=False)
        elif self.state is MailboxState.RESTARTING:
            self.mark_exited(self._last_exit or SHUTDOWN, restarting=False)

    async def wait_exit(self) -> ExitReason:
        """Wait until the current incarnation exits; return its reason (a monitor).

        On a stopped path it returns the last reason at once, as an Erlang monitor of a
        dead process fires at once.
        """
        if self.state is MailboxState.STOPPED:
            await trio.lowlevel.checkpoint()
            return self._last_exit or SHUTDOWN
        event = trio.Event()
        self._exit_waiters.append(event)
        await event.wait()
        assert self._last_exit is not None
        return self._last_exit

    def statistics(self) -> ActorStatistics:
        return ActorStatistics(
            path=self.path,
            state=self.state.value,
            messages_in=self.messages_in,
            replies_out=self._replies_out,
            decode_errors=self.decode_errors,
            dropped=self._dropped,
            rejected=self._rejected,
            queue_depth=self._send.statistics().current_buffer_used,
            pending_asks=len(self._pending),
            restarts=self.restarts,
            last_exit_reason=self._last_exit.describe() if self._last_exit else None,
            monitors=len(self._monitors),
        )
