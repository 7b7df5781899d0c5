"""The actor kernel: mailboxes, references, the actor loop, monitors and statistics.

An actor owns a mailbox (a bounded trio memory channel carrying msgpack-encoded messages)
and handles one message at a time; nothing else touches its state. A mailbox belongs to a
path, not to one incarnation: it outlives restarts, stashes what arrives while its actor
restarts, and fails every waiting `ask` at once when the actor exits. This module knows
nothing of models, transports or supervision strategies.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar, final, overload

import msgspec
import structlog
import trio

from corral.protocol.codec import Decoder, encode
from corral.protocol.errors import (
    ActorExitedError,
    Code,
    CorralError,
    EngineClientError,
    OverloadedError,
    TimeoutError,
)
from corral.protocol.messages import SHUTDOWN, ExitReason, LifecycleEvent

M = TypeVar("M")

_log = structlog.get_logger("corral.actors")
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


R = TypeVar("R")
ReplyT = TypeVar("ReplyT", covariant=True)


class Asks(Protocol[ReplyT]):
    """A message that expects an answer: its class names the answer's type."""

    @property
    def reply_type(self) -> type[ReplyT]: ...


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

_reply_decoders: dict[Any, Decoder[Any]] = {}


def _reply_decoder(reply_type: Any) -> Decoder[Any]:
    decoder = _reply_decoders.get(reply_type)
    if decoder is None:
        decoder = _reply_decoders[reply_type] = Decoder(reply_type)
    return decoder


@final
class Mailbox:
    """The queue of one actor path, shared by all its incarnations.

    Running: sends queue up to `capacity`; `send` then waits, `send_nowait` raises
    OverloadedError. Restarting: sends are stashed up to `stash_limit`, beyond that they
    are rejected with OverloadedError (the overflow policy). Stopped: sends raise
    ActorExitedError with the last exit reason.
    """

    __slots__ = (
        "_decode_errors",
        "_dropped",
        "_exit_waiters",
        "_last_exit",
        "_messages_in",
        "_monitors",
        "_pending",
        "_recv",
        "_rejected",
        "_replies_out",
        "_send",
        "keep_tells",
        "path",
        "restarts",
        "stash_limit",
        "state",
    )

    def __init__(self, path: str, *, capacity: int, stash_limit: int) -> None:
        self.path = path
        self._send, self._recv = trio.open_memory_channel[Envelope](capacity)
        self.stash_limit = stash_limit
        self.state = MailboxState.RESTARTING
        self._pending: set[Reply] = set()
        self._exit_waiters: list[trio.Event] = []
        self._monitors: list[Callable[[ExitReason], None]] = []
        self.keep_tells = False
        self._last_exit: ExitReason | None = None
        self.restarts = 0
        self._messages_in = 0
        self._replies_out = 0
        self._decode_errors = 0
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
            messages_in=self._messages_in,
            replies_out=self._replies_out,
            decode_errors=self._decode_errors,
            dropped=self._dropped,
            rejected=self._rejected,
            queue_depth=self._send.statistics().current_buffer_used,
            pending_asks=len(self._pending),
            restarts=self.restarts,
            last_exit_reason=self._last_exit.describe() if self._last_exit else None,
            monitors=len(self._monitors),
        )


@final
class ActorRef:
    """The address of an actor path: stable across restarts, cheap to copy.

    `tell` is fire-and-forget; `ask` waits for the answer. Messages are encoded on send,
    so the receiver never shares an object with the sender.
    """

    __slots__ = ("_default_timeout", "_mailbox", "_send_nowait", "path")

    def __init__(self, mailbox: Mailbox, default_timeout: float) -> None:
        self._mailbox = mailbox
        self._send_nowait = mailbox._send.send_nowait  # the fast path, bound once
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
        if self._mailbox.state is _RUNNING:
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
                    await reply._done.wait()
        finally:
            self._mailbox._pending.discard(reply)
        if not reply.done:
            raise TimeoutError(method, limit, request_id, trio.current_time() - started)
        if reply._error is not None:
            raise reply._error
        if reply_type is None:
            return None
        assert reply._payload is not None
        return _reply_decoder(reply_type).decode(reply._payload)

    async def wait_exit(self) -> ExitReason:
        """Wait until the actor's current incarnation exits; return why."""
        return await self._mailbox.wait_exit()

    def statistics(self) -> ActorStatistics:
        return self._mailbox.statistics()


_EVENT_NAMES: dict[str, str] = {
    "started": "actor.started", "exited": "actor.exited", "restarting": "actor.restarting",
    "restarted": "actor.restarted", "stopped": "actor.stopped",
    "intensity_exceeded": "supervisor.intensity_exceeded",
    "start_failed": "actor.start_failed",
}
_ALARMING = frozenset({"exited", "intensity_exceeded", "start_failed"})
_ROUTINE = frozenset({"started", "stopped"})  # every start and shutdown: debug level


class Listener(Protocol):
    def __call__(self, event: LifecycleEvent) -> None: ...


@final
class ActorSystem:
    """The registry of mailboxes by path, the kernel's settings, and event listeners.

    One per runtime. Paths are like registered names in Erlang: the same path always
    gets the same mailbox, so references survive restarts of the actor and its parents.
    """

    def __init__(self, *, mailbox_capacity: int = 1024, stash_limit: int = 256,
                 fairness_interval: int = 64, default_ask_timeout: float = 30.0) -> None:
        self.mailbox_capacity = mailbox_capacity
        self.stash_limit = min(stash_limit, mailbox_capacity)
        self.fairness_interval = fairness_interval
        self.default_ask_timeout = default_ask_timeout
        self._mailboxes: dict[str, Mailbox] = {}
        self._listeners: list[Listener] = []

    def mailbox(self, path: str) -> Mailbox:
        mailbox = self._mailboxes.get(path)
        if mailbox is None:
            mailbox = self._mailboxes[path] = Mailbox(
                path, capacity=self.mailbox_capacity, stash_limit=self.stash_limit)
        return mailbox

    def forget(self, path: str) -> None:
        """Drop a stopped path so the name can be reused by a fresh child."""
        mailbox = self._mailboxes.get(path)
        if mailbox is not None and mailbox.state is MailboxState.STOPPED:
            del self._mailboxes[path]

    def ref(self, path: str) -> ActorRef:
        return ActorRef(self.mailbox(path), self.default_ask_timeout)

    def paths(self) -> list[str]:
        return list(self._mailboxes)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every lifecycle event; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, event: LifecycleEvent) -> None:
        fields: dict[str, Any] = {"actor": event.path}
        if event.reason is not None:
            fields["reason"] = event.reason.describe()
        if event.attempt:
            fields["attempt"] = event.attempt
        if event.delay_s:
            fields["delay_s"] = round(event.delay_s, 6)
        if event.kind in _ALARMING and (event.reason is None or event.reason.abnormal):
            log = _log.warning
        elif event.kind in _ROUTINE or event.kind in _ALARMING:
            log = _log.debug
        else:
            log = _log.info
        log(_EVENT_NAMES[event.kind], **fields)
        for listener in list(self._listeners):
            listener(event)


@final
class Context:
    """What a child incarnation gets from its supervisor: its path, mailbox and system.

    `request_stop` asks for a graceful stop: an idle actor wakes at once, a busy one
    finishes the current message first. The supervisor cancels the child if its
    shutdown timeout passes first.
    """

    __slots__ = ("_stop_event", "_wakers", "log", "mailbox", "path", "stop_requested", "system")

    def __init__(self, path: str, system: ActorSystem) -> None:
        self.path = path
        self.system = system
        self.mailbox = system.mailbox(path)
        self.log = _log.bind(actor=path)
        self.stop_requested = False
        self._stop_event = trio.Event()
        self._wakers: list[Callable[[], None]] = []

    @property
    def ref(self) -> ActorRef:
        return ActorRef(self.mailbox, self.system.default_ask_timeout)

    def request_stop(self) -> None:
        if self.stop_requested:
            return
        self.stop_requested = True
        self._stop_event.set()
        for wake in self._wakers:
            wake()

    def on_stop_requested(self, wake: Callable[[], None]) -> None:
        """Register a synchronous callback run once when a stop is requested."""
        self._wakers.append(wake)

    async def wait_stop_requested(self) -> None:
        await self._stop_event.wait()


class Child(Protocol):
    """Anything a supervisor can run: an Actor, a Supervisor, or a plain task.

    `run` calls `task_status.started()` once it is ready to serve (its init), then
    runs until it returns (a normal exit), raises (a crash), or its supervisor asks it to
    stop (`ctx.request_stop`) or cancels it.
    """

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...


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
                self.ctx.mailbox._send.send_nowait((None, None))

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
        receive_nowait = mailbox._recv.receive_nowait
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
                payload, reply = await mailbox._recv.receive()
                self._idle = False
                burst = 0
            if payload is None:
                continue
            mailbox._messages_in += 1
            try:
                message = decode(payload)
            except _DECODE_ERRORS as exc:
                mailbox._decode_errors += 1
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

