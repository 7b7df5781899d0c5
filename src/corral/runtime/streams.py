"""The stream registry: admission, deadlines and delivery of tokens to client streams.

The registry actor decides which streams run (at most `max_active_streams`, then up to
`max_queued` waiting, then Overloaded), fairly between clients (a freed slot goes to
the waiting client with the fewest streams running; a full queue makes room for a
client by refusing the newest waiter of the client that holds the most), ends streams
at their deadline, and routes each engine step's tokens to the client end of every
stream (`StreamBuffer`, in `corral.runtime.stream_buffers`). Buffers live in a
`StreamTable` owned by the runtime, not by the actor, so a restarted registry picks the
open streams back up from it.
This module knows nothing of MLX, HTTP or how tokens are made.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any, Final

import msgspec
import trio

from corral.actors.actor import Actor
from corral.actors.mailbox import Reply
from corral.actors.ref import ActorRef
from corral.config import StreamRegistryConfig
from corral.protocol.errors import (
    ActorExitedError,
    Code,
    CorralError,
    EngineClientError,
    OverloadedError,
    TimeoutError,
    model_unloaded,
)
from corral.protocol.messages import EngineSequence, FinishReason
from corral.protocol.serving_messages import (
    Admit,
    Admitted,
    CancelSequence,
    CloseStream,
    DeadlinesDue,
    GetRegistryState,
    ListSequences,
    ModelDown,
    ModelOutput,
    Reconcile,
    RegistryState,
    Submit,
)
from corral.runtime.stream_buffers import StreamBuffer, StreamTable

_MAX_STALL_RESUMES: Final = 2  # a stream's engine stalling a third time ends it


class _Entry:
    """The registry's record of one admitted or queued stream."""

    __slots__ = ("admit", "client", "deadline", "model", "priority", "reply", "request_id",
                 "stream_id", "timeout_s")

    def __init__(self, stream_id: int, model: str, deadline: float, timeout_s: float,
                 request_id: str | None, client: str | None,
                 admit: Admit | None = None) -> None:
        self.stream_id = stream_id
        self.model = model
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.request_id = request_id
        self.client = client
        self.admit = admit  # what to open the buffer with; None once it is open
        self.priority = admit.priority if admit is not None else 0  # lower goes first
        self.reply: Reply | None = None

    @property
    def waiting(self) -> bool:
        """Queued, and its caller still waits for the answer."""
        return self.reply is not None and self.reply.wanted


RegistryMessage = (Admit | ModelOutput | CloseStream | ModelDown | Reconcile | DeadlinesDue
                   | GetRegistryState)


class StreamRegistry(Actor[RegistryMessage]):
    """Admits streams, enforces deadlines and idle readers, routes tokens to buffers.

    On (re)start it takes up every open buffer of the table as an active stream, so a
    registry crash loses no stream. A model's exit (ModelDown) ends that model's streams
    with a retryable GenerationError carrying the partial text.

    Admission goes by priority (`Admit.priority`, lower first, as vLLM's), and within
    one priority is fair between clients (`Admit.client`): a queued stream's turn comes
    by its priority first, its client's running streams second and its arrival last.
    When the queue is full, a newcomer takes the place of the newest waiter of the
    lowest priority below its own; failing that, a client with fewer streams (running
    and queued) than another of the newcomer's priority takes the place of that one's
    newest waiter. The waiter refused gets Overloaded. One client that holds many
    slots, or never reads, thus never keeps the others of its priority waiting behind
    its own. A running stream is never preempted.
    """

    Message = RegistryMessage
    keeps_tells_across_restarts = True  # tokens queued at a crash reach the next one

    def __init__(self, config: StreamRegistryConfig, table: StreamTable,
                 model_ref: Callable[[str], ActorRef], *, max_resumes: int = 3) -> None:
        self._config = config
        self._max_resumes = max_resumes
        self._table = table
        self._model_ref = model_ref
        self._active: dict[int, _Entry] = {}
        self._queue: collections.deque[_Entry] = collections.deque()
        self._deadline_changed = trio.Event()
        self._idle_limit = config.idle_reader_timeout_ms / 1000.0

    async def on_start(self) -> None:
        for buffer in self._table.open_buffers():
            self._active[buffer.stream_id] = _Entry(
                buffer.stream_id, buffer.model, buffer.deadline, buffer.timeout_s,
                buffer.request_id, buffer.client)
        self.start_soon(self._watch_deadlines)
        if self._active:
            self.start_soon(self._reconcile, {e.model for e in self._active.values()})

    async def handle(self, message: RegistryMessage) -> Any:
        match message:
            case ModelOutput():
                await self._deliver(message)
            case Admit():
                return self._admit(message)
            case CloseStream(stream_id=stream_id, reason=reason):
                await self._close(stream_id, reason, None)
            case ModelDown(model=model, unloaded=True):
                for entry in [e for e in self._active.values() if e.model == model]:
                    await self._end_unloaded(entry)
            case ModelDown(model=model, reason=reason):
                stalled = reason.error == "EngineStalled"
                for entry in [e for e in self._active.values() if e.model == model]:
                    await self._recover(entry, reason.describe(), stalled=stalled)
            case Reconcile(model=model, running=running):
                for entry in [e for e in self._active.values()
                              if e.model == model and e.stream_id not in running]:
                    await self._recover(entry, "not running after a registry restart")
            case DeadlinesDue(now=now):
                await self._expire(now)
                self._deadline_changed.set()  # the watcher computes the next deadline
            case GetRegistryState():
                return RegistryState(
                    active=len(self._active), queued=len(self._queue),
                    streams={sid: e.model for sid, e in self._active.items()})
        return None

    # -- admission -----------------------------------------------------------------

    def _admit(self, message: Admit) -> Admitted | None:
        if self._reply is not None and not self._reply.wanted:
            return None  # the caller gave up while this waited in the mailbox
        deadline = trio.current_time() + message.timeout_s
        entry = _Entry(message.stream_id, message.model, deadline, message.timeout_s,
                       message.request_id, message.client, message)
        if len(self._active) < self._config.max_active_streams:
            return self._open(entry)
        self._queue = collections.deque(e for e in self._queue if e.waiting)
        if len(self._queue) >= self._config.max_queued and not self._make_room(entry):
            raise self._overloaded()
        entry.reply = self.defer_reply()
        self._queue.append(entry)
        self._deadline_changed.set()
        return None

    def _overloaded(self) -> OverloadedError:
        return OverloadedError(
            f"{len(self._active)} streams running and {len(self._queue)} waiting",
            retry_after_ms=self._config.overloaded_retry_after_ms,
            details={"active": len(self._active), "queued": len(self._queue)})

    def _held(self) -> collections.Counter[str | None]:
        """Streams per client, running and queued."""
        return collections.Counter(e.client for e in (*self._active.values(), *self._queue))

    def _make_room(self, newcomer: _Entry) -> bool:
        """Refuse a waiter for `newcomer`: the newest of the lowest priority, if that is
        below the newcomer's; else the newest waiter of the newcomer's priority whose
        client holds the most streams, if it holds at least two more than the
        newcomer's client. Returns whether room was made."""
        if not self._queue:
            return False
        lowest = max(e.priority for e in self._queue)
        if lowest > newcomer.priority:
            victim = next(e for e in reversed(self._queue) if e.priority == lowest)
            self._refuse(victim, "the queue is full and a request of a higher priority "
                         f"({newcomer.priority} against {lowest}) took this one's place",
                         {"priority": lowest})
            return True
        peers = [e for e in self._queue if e.priority == newcomer.priority]
        if not peers:
            return False
        held = self._held()
        most = max((e.client for e in peers), key=lambda c: held[c])
        if held[most] <= held[newcomer.client] + 1:
            return False
        self._refuse(next(e for e in reversed(peers) if e.client == most),
                     f"the queue is full and this client holds {held[most]} streams, the "
                     "most of any client: its newest waiting stream gave way to another "
                     "client's", {"client_streams": held[most]})
        return True

    def _refuse(self, victim: _Entry, why: str, details: dict[str, Any]) -> None:
        """Take `victim` off the queue; its caller gets Overloaded, saying `why`."""
        self._queue.remove(victim)
        assert victim.reply is not None
        victim.reply.fail(OverloadedError(
            why, retry_after_ms=self._config.overloaded_retry_after_ms,
            details={"active": len(self._active), "queued": len(self._queue), **details}))

    def _open(self, entry: _Entry) -> Admitted:
        """Make `entry` active and open its buffer in the table, in one step."""
        admit = entry.admit
        assert admit is not None
        buffer = StreamBuffer(entry.stream_id, entry.model, request_id=entry.request_id,
                              timeout_s=entry.timeout_s, deadline=entry.deadline,
                              prompt_tokens=len(admit.prompt),
                              logprobs=admit.sampling.reports_logprobs,
                              alternatives=admit.sampling.top_logprobs > 0,
                              client=entry.client)
        buffer.sequence = EngineSequence(entry.stream_id, admit.prompt, admit.sampling,
                                         admit.grammar, list(admit.generated))
        self._table.add(buffer)
        entry.admit = None
        self._active[entry.stream_id] = entry
        self._deadline_changed.set()
        return Admitted(entry.stream_id, entry.deadline)

    def _release(self, stream_id: int) -> None:
        self._active.pop(stream_id, None)
        while self._queue and len(self._active) < self._config.max_active_streams:
            entry = self._next_waiter()
            if entry is None:
                self._queue.clear()  # every caller gave up while it waited
                return
            self._queue.remove(entry)
            assert entry.reply is not None
            entry.reply.send(self._open(entry))

    def _next_waiter(self) -> _Entry | None:
        """The waiter of the first priority whose client runs the fewest streams; the
        earliest among equals."""
        running = collections.Counter(e.client for e in self._active.values())
        waiting = [e for e in self._queue if e.waiting]
        return min(waiting, key=lambda e: (e.priority, running[e.client]), default=None)

    # -- delivery --------------------------------------------------------------------

    async def _deliver(self, message: ModelOutput) -> None:
        now = trio.current_time()
        for out in message.outputs:
            buffer = self._table.get(out.seq_id)
            if buffer is None or buffer.ended:
                # The client went away between steps: stop the sequence.
                if out.finish_reason is None:
                    await self._tell_model(message.model, CancelSequence(out.seq_id))
                self._release(out.seq_id)
                continue
            buffer.push(out)
            if out.finish_reason is not None:
                self._release(out.seq_id)
            elif (buffer.has_unread and not buffer.reader_waiting
                  and now - buffer.last_read_at > self._idle_limit):
                await self._close(out.seq_id, "cancelled", EngineClientError(
                    Code.CANCELLED,
                    f"stream {out.seq_id} cancelled: its reader was idle for more than "
                    f"{self._idle_limit:g}s", {"stream_id": out.seq_id}))

    async def _close(self, stream_id: int, reason: FinishReason, error: CorralError | None,
                     *, cancel_sequence: bool = True) -> None:
        for waiting in [e for e in self._queue if e.stream_id == stream_id]:
            self._queue.remove(waiting)  # its caller left before it was admitted
        entry = self._active.get(stream_id)
        if entry is not None and cancel_sequence:
            await self._tell_model(entry.model, CancelSequence(stream_id))
        buffer = self._table.get(stream_id)
        if buffer is not None:
            buffer.finish(reason, error)
        self._release(stream_id)

    async def _tell_model(self, model: str, message: CancelSequence) -> None:
        # A model that is gone has no sequence left to cancel.
        try:
            self._model_ref(model).tell_nowait(message)
        except (ActorExitedError, OverloadedError):
            self.ctx.log.info("registry.cancel_undelivered", model=model,
                              stream_id=message.seq_id)

    def _still_open(self, entry: _Entry) -> StreamBuffer | None:
        """The buffer of a stream the model lost, or None when there is nothing left to
        end: its caller already left (its CloseStream releases the slot), or it ended
        (the slot is released here)."""
        buffer = self._table.get(entry.stream_id)
        if buffer is not None and buffer.ended:
            self._release(entry.stream_id)
            return None
        return buffer

    async def _end_unloaded(self, entry: _Entry) -> None:
        """A stream whose model was unloaded: it ends with ModelNotLoaded and its text so
        far (`model_unloaded`); the unload stops its sequence with the engine."""
        buffer = self._still_open(entry)
        if buffer is None:
            return
        await self._close(entry.stream_id, "error", model_unloaded(
            entry.model, buffer.text, len(buffer.tokens)), cancel_sequence=False)

    async def _recover(self, entry: _Entry, why: str, *, stalled: bool = False) -> None:
        """A stream whose sequence the model lost: resume it, or end it with the text so far.

        Resumed (the client sees one unbroken stream): sequences with deterministic
        sampling, and any sequence that had produced nothing yet. They are re-submitted
        as prompt + tokens already delivered, which count toward max_tokens; a submit to a
        restarting model waits in its stash. Others end with a retryable
        GenerationError carrying `partial_text`. A stream whose engine `stalled` a third
        time since it started ends with a GenerationError that is not retryable: the
        same work would stall the same way, so it is not resumed in a loop.
        """
        buffer = self._still_open(entry)
        if buffer is None:
            return
        if stalled:
            buffer.stalls += 1
            if buffer.stalls > _MAX_STALL_RESUMES:
                await self._close(entry.stream_id, "error", EngineClientError(
                    Code.GENERATION_ERROR,
                    f"model {entry.model} stalled {buffer.stalls} times on this stream, "
                    f"and it was resumed {_MAX_STALL_RESUMES} times: {why}",
                    {"partial_text": buffer.text, "model": entry.model,
                     "completion_tokens": len(buffer.tokens), "stalls": buffer.stalls},
                    retryable=False), cancel_sequence=False)
                return
        seq = buffer.sequence
        if (seq is not None and (not buffer.tokens or seq.sampling.deterministic)
                and buffer.resumes < self._max_resumes):
            resumed = msgspec.structs.replace(seq, generated=[*seq.generated, *buffer.tokens])
            if resumed.remaining <= 0:
                await self._close(entry.stream_id, "length", None, cancel_sequence=False)
                return
            try:
                self._model_ref(entry.model).tell_nowait(Submit(resumed))
            except CorralError as exc:
                why = f"{why}; resume refused: {exc.message}"
            else:
                buffer.resumes += 1
                self.ctx.log.info("registry.stream_resumed", stream_id=entry.stream_id,
                                  model=entry.model, delivered=len(buffer.tokens), why=why)
                return
        await self._close(entry.stream_id, "error", EngineClientError(
            Code.GENERATION_ERROR, f"model {entry.model} lost the stream: {why}",
            {"partial_text": buffer.text, "model": entry.model,
             "completion_tokens": len(buffer.tokens)}, retryable=True),
            cancel_sequence=False)

    async def _reconcile(self, models: set[str]) -> None:
        """After a restart: ask each model which sequences it runs (a background task)."""
        for model in models:
            try:
                running = await self._model_ref(model).ask(ListSequences(), timeout=5.0)
            except CorralError as exc:
                self.ctx.log.warning("registry.reconcile_failed", model=model, error=repr(exc))
                continue
            await self.ctx.ref.tell(Reconcile(model, running.seq_ids))

    # -- deadlines ------------------------------------------------------------------

    async def _expire(self, now: float) -> None:
        for entry in [e for e in self._active.values() if e.deadline <= now]:
            await self._close(entry.stream_id, "timeout", self._timeout(entry, now))
        waiting = [e for e in self._queue if e.deadline <= now]
        for entry in waiting:
            self._queue.remove(entry)
            if entry.reply is not None:
                entry.reply.fail(self._timeout(entry, now))

    @staticmethod
    def _timeout(entry: _Entry, now: float) -> TimeoutError:
        return TimeoutError("generate", entry.timeout_s, entry.request_id,
                            now - (entry.deadline - entry.timeout_s))

    async def _watch_deadlines(self) -> None:
        """Tell this actor when the earliest deadline passes (a background task)."""
        while True:
            self._deadline_changed = trio.Event()
            deadlines = [e.deadline for e in self._active.values()]
            deadlines += [e.deadline for e in self._queue]
            earliest = min(deadlines, default=math.inf)
            with trio.move_on_at(earliest):
                await self._deadline_changed.wait()
                continue
            await self.ctx.ref.tell(DeadlinesDue(trio.current_time()))
            # Wait for the message to be handled before computing the next deadline.
            await self._deadline_changed.wait()
