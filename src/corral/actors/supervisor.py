"""Supervisors: start children, watch them, restart them by strategy, give up by intensity.

Each child runs in its own cancel scope inside the supervisor's nursery, so restarting
one never cancels its siblings. A child's exit reaches the supervisor as an event with a
reason, never as an exception that tears the nursery down. When restarts exceed
`intensity` (max_restarts within period), the supervisor stops its children in reverse
start order and raises EscalationError to its own parent. This module knows nothing of
what its children do.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Literal, final

import msgspec
import trio

from corral.actors.backoff import base_delay, spread
from corral.actors.core import ActorRef, ActorSystem, Child, Context
from corral.protocol.errors import (
    ActorExitedError,
    ChildStartError,
    Code,
    CorralError,
    EngineClientError,
    EscalationError,
)
from corral.protocol.messages import (
    KILLED,
    NORMAL,
    SHUTDOWN,
    ExitReason,
    LifecycleEvent,
    innermost,
)


class Restart(enum.StrEnum):
    """When a child that exits is restarted (OTP's restart types)."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after an abnormal exit (an error)
    TEMPORARY = "temporary"  # never


class Strategy(enum.StrEnum):
    ONE_FOR_ONE = "one_for_one"  # restart the child that exited
    ONE_FOR_ALL = "one_for_all"  # stop all others, restart all
    REST_FOR_ONE = "rest_for_one"  # stop those started after it, restart it and them
    DYNAMIC = "dynamic"  # one_for_one over children added at run time, stopped together


AutoShutdown = Literal["never", "any_significant", "all_significant"]
Shutdown = Literal["brutal", "infinity"] | int
"""How a child is stopped: cancel at once, wait forever, or wait that many ms then cancel."""


class ChildSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How to start, restart and stop one child.

    Attributes:
        name: unique among its siblings; the child's path is ``<parent path>/<name>``.
        factory: makes a fresh child object for each incarnation.
        restart: permanent, transient or temporary.
        shutdown: "brutal", "infinity" (the default for supervisors) or a timeout in ms.
        significant: with the supervisor's `auto_shutdown`, a significant child's
            normal exit stops the supervisor (OTP's significant children).
    """

    name: str
    factory: Callable[[], Child]
    restart: Restart = Restart.PERMANENT
    shutdown: Shutdown = 5000
    significant: bool = False


class Intensity(msgspec.Struct, frozen=True):
    """At most `max_restarts` restarts within `period` seconds, per supervisor."""

    max_restarts: int = 3
    period: float = 5.0


class Backoff(msgspec.Struct, frozen=True):
    """Exponential delay before a restart: min·2^attempt spread ± random_factor, never
    above max, jitter included (`backoff.spread`). A child that ran `reset_after`
    seconds starts again at attempt 0.
    """

    min: float = 0.01
    max: float = 5.0
    random_factor: float = 0.2
    reset_after: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = base_delay("exponential", attempt + 1, self.min, 2.0, self.max)
        return spread(base, self.max, self.random_factor, rng.random())


class ChildInfo(msgspec.Struct, frozen=True):
    name: str
    path: str
    state: Literal["running", "restarting", "stopped"]
    restarts: int
    restart: Restart


class SupervisorStatistics(msgspec.Struct, frozen=True):
    path: str
    strategy: str
    children: list[ChildInfo]
    restarts_in_window: int
    total_restarts: int


class _Slot:
    """One child position: the spec, the live incarnation, its backoff count."""

    __slots__ = ("attempt", "ctx", "done", "incarnation", "killed", "obj", "restarts",
                 "running", "scope", "spec", "started_at", "terminating")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.incarnation = 0
        self.running = False
        self.terminating = False
        self.killed = False
        self.restarts = 0
        self.attempt = 0
        self.started_at = -math.inf
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.ctx: Context | None = None
        self.obj: Child | None = None


class _Exited(msgspec.Struct, frozen=True):
    name: str
    incarnation: int
    reason: ExitReason
    error: BaseException | None


class _RestartDue(msgspec.Struct, frozen=True):
    names: tuple[str, ...]
    token: int


class _Call(msgspec.Struct, frozen=True):
    """A control request from another task, run by the supervisor's own loop."""

    operation: Callable[[], object]
    done: trio.Event
    result: list[object]


class _Stop(msgspec.Struct, frozen=True):
    pass


@final
class Supervisor:
    """Runs children by a strategy; itself a child of another supervisor or the root.

    Control calls (`start_child`, `terminate_child`) are executed by the supervisor's own
    loop, one at a time, so its state has a single writer.
    """

    def __init__(self, children: Sequence[ChildSpec] = (), *,
                 strategy: Strategy = Strategy.ONE_FOR_ONE,
                 intensity: Intensity = Intensity(),
                 backoff: Backoff = Backoff(),
                 auto_shutdown: AutoShutdown = "never",
                 rng: random.Random | None = None) -> None:
        names = [spec.name for spec in children]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate child names: {names}")
        self.strategy = strategy
        self.intensity = intensity
        self.backoff = backoff
        self.auto_shutdown = auto_shutdown
        self._rng = rng or random.Random()
        self._initial = list(children)
        self._slots: dict[str, _Slot] = {}
        self._restart_times: deque[float] = deque()
        self._total_restarts = 0
        self._restart_token = 0
        self._pending_restart: dict[str, int] = {}
        self._events_send, self._events = trio.open_memory_channel[object](math.inf)
        self._ctx: Context | None = None
        self._nursery: trio.Nursery | None = None
        self._started = trio.Event()
        self._stopped = False

    # -- public surface ------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._ctx.path if self._ctx else "<not started>"

    def ref(self, name: str) -> ActorRef:
        """The reference of child `name` (valid before, during and after its restarts)."""
        ctx = self._require_ctx()
        return ctx.system.ref(f"{ctx.path}/{name}")

    def child(self, name: str) -> Child | None:
        """The live object of child `name`, or None while it is not running."""
        slot = self._slots.get(name)
        return slot.obj if slot is not None and slot.running else None

    async def start_child(self, spec: ChildSpec) -> ActorRef:
        """Add and start a child at run time.

        Raises:
            EngineClientError(InvalidParams): a child of that name exists, or the name
                holds a ``/`` (it would address a grandchild's path, not a new one).
            ChildStartError: the child failed to start (it is not added); the cause is
                chained.
            ActorExitedError: this supervisor has stopped.
        """
        if "/" in spec.name:
            raise EngineClientError(Code.INVALID_PARAMS,
                                    f"{self.path}: a child's name holds no '/': {spec.name!r}")

        async def operation() -> ActorRef:
            if spec.name in self._slots:
                raise EngineClientError(Code.INVALID_PARAMS,
                                        f"{self.path} already has a child {spec.name!r}")
            slot = self._slots[spec.name] = _Slot(spec)
            try:
                await self._start(slot)
            except BaseException:
                self._remove(slot)
                raise
            return self.ref(spec.name)

        ref = await self._call(operation)
        assert isinstance(ref, ActorRef)
        return ref

    async def terminate_child(self, name: str) -> None:
        """Stop child `name` by its shutdown spec and remove it; no restart follows.

        Raises:
            EngineClientError(InvalidParams): no such child.
            ActorExitedError: this supervisor has stopped.
        """
        async def operation() -> None:
            slot = self._slots.get(name)
            if slot is None:
                raise EngineClientError(Code.INVALID_PARAMS, f"{self.path} has no child {name!r}")
            await self._terminate(slot)
            self._remove(slot)

        await self._call(operation)

    def kill_child(self, name: str) -> None:
        """Kill child `name` at once, as an abnormal exit (Erlang's `exit(Pid, kill)`).

        Its restart type then decides what follows, as for a crash. For operators and
        fault-injection tests. Unknown or stopped children are ignored.
        """
        slot = self._slots.get(name)
        if slot is not None and slot.running:
            slot.killed = True
            slot.scope.cancel()

    def which_children(self) -> list[ChildInfo]:
        return [self._info(slot) for slot in self._slots.values()]

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(
            path=self.path, strategy=self.strategy.value, children=self.which_children(),
            restarts_in_window=len(self._restart_times), total_restarts=self._total_restarts)

    # -- the run loop --------------------------------------------------------------

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start children in order, then supervise until stopped or escalated.

        A child that fails to start fails this start too: the ones already started are
        stopped in reverse order and the error propagates. On a graceful stop children
        stop in reverse start order (all at once under the dynamic strategy).

        Raises:
            EscalationError: restart intensity exceeded (after all children stopped).
        """
        self._ctx = ctx
        ctx.on_stop_requested(lambda: self._events_send.send_nowait(_Stop()))
        failure: CorralError | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for spec in self._initial:
                    slot = self._slots[spec.name] = _Slot(spec)
                    await self._start(slot)
                ctx.mailbox.mark_running()
                task_status.started()
                self._started.set()
                await self._loop()
            except (EscalationError, ChildStartError) as exc:
                failure = exc
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_all()
                self._refuse_calls()
                nursery.cancel_scope.cancel()
        # Raised here, outside the nursery, so the parent sees the error itself rather
        # than an exception group.
        if failure is not None:
            raise failure

    async def _loop(self) -> None:
        async for event in self._events:
            if isinstance(event, _Stop):
                return
            if isinstance(event, _Call):
                try:
                    event.result.append(await event.operation())  # type: ignore[misc]
                except Exception as exc:  # the caller gets it; the supervisor goes on
                    event.result.append(_Failure(exc))
                event.done.set()
            elif isinstance(event, _Exited):
                if await self._on_exit(event):
                    return
            elif isinstance(event, _RestartDue):
                await self._restart_due(event)

    # -- exits and restarts ----------------------------------------------------------

    async def _on_exit(self, event: _Exited) -> bool:
        """Decide what an exit means. Returns True when the supervisor should stop.

        Raises:
            EscalationError: this restart would exceed the intensity.
        """
        slot = self._slots.get(event.name)
        if slot is None or slot.incarnation != event.incarnation or slot.terminating:
            return False
        ctx = self._require_ctx()
        path = self._child_path(slot.spec.name)
        restart = slot.spec.restart is Restart.PERMANENT or (
            slot.spec.restart is Restart.TRANSIENT and event.reason.abnormal)
        ctx.system.mailbox(path).mark_exited(event.reason, restarting=restart)
        now = trio.current_time()
        ctx.system.emit(LifecycleEvent("exited", path, now, event.reason))
        if not restart:
            self._remove(slot)
            return self._auto_shutdown_due(slot)
        self._restart_times.append(now)
        while self._restart_times and self._restart_times[0] <= now - self.intensity.period:
            self._restart_times.popleft()
        if len(self._restart_times) > self.intensity.max_restarts:
            chain = (f"{ctx.path} exceeded {self.intensity.max_restarts} restarts in "
                     f"{self.intensity.period}s",
                     *self._reason_chain(slot, event))
            ctx.system.emit(LifecycleEvent("intensity_exceeded", ctx.path, now, event.reason))
            raise EscalationError(ctx.path, chain)
        if now - slot.started_at >= self.backoff.reset_after:
            slot.attempt = 0
        delay = self.backoff.delay(slot.attempt, self._rng)
        slot.attempt += 1
        group = self._restart_group(slot)
        self._restart_token += 1
        for name in group:
            self._pending_restart[name] = self._restart_token
        # Siblings restarted with it are stopped now, in reverse order, so none runs on
        # without the child it depends on while the backoff passes.
        for name in reversed(group):
            sibling = self._slots[name]
            if sibling.running:
                await self._terminate(sibling)
                ctx.system.mailbox(self._child_path(name)).mark_exited(SHUTDOWN, restarting=True)
            if sibling.spec.restart is Restart.TEMPORARY:
                self._remove(sibling)  # never restarted, not even with its group (as in OTP)
        ctx.system.emit(LifecycleEvent("restarting", path, now, event.reason,
                                       attempt=slot.attempt, delay_s=delay))
        self._nursery_required().start_soon(self._restart_after, group, self._restart_token,
                                            delay)
        return False

    def _reason_chain(self, slot: _Slot, event: _Exited) -> tuple[str, ...]:
        if isinstance(event.error, EscalationError):
            return event.error.chain
        return (f"{self._child_path(slot.spec.name)} exited: {event.reason.describe()}",)

    def _restart_group(self, slot: _Slot) -> tuple[str, ...]:
        """The children restarted together with `slot`, in start order."""
        names = list(self._slots)
        if self.strategy is Strategy.ONE_FOR_ALL:
            return tuple(names)
        if self.strategy is Strategy.REST_FOR_ONE:
            return tuple(names[names.index(slot.spec.name):])
        return (slot.spec.name,)

    async def _restart_after(self, group: tuple[str, ...], token: int, delay: float) -> None:
        await trio.sleep(delay)
        self._events_send.send_nowait(_RestartDue(group, token))

    async def _restart_due(self, event: _RestartDue) -> None:
        ctx = self._require_ctx()
        for name in event.names:
            slot = self._slots.get(name)
            if slot is None or self._pending_restart.get(name) != event.token:
                continue
            del self._pending_restart[name]
            slot.restarts += 1
            self._total_restarts += 1
            ctx.system.mailbox(self._child_path(name)).restarts += 1
            try:
                await self._start(slot)
            except ChildStartError as exc:
                # A restart that fails to start counts as one more crash of that child.
                self._events_send.send_nowait(_Exited(
                    name, slot.incarnation, ExitReason.from_exception(exc.__cause__ or exc),
                    exc))
                continue
            ctx.system.emit(LifecycleEvent("restarted", self._child_path(name),
                                           trio.current_time(), attempt=slot.attempt))

    def _auto_shutdown_due(self, slot: _Slot) -> bool:
        if not slot.spec.significant or self.auto_shutdown == "never":
            return False
        if self.auto_shutdown == "any_significant":
            return True
        return not any(s.spec.significant for s in self._slots.values())

    # -- starting and stopping children -------------------------------------------

    async def _start(self, slot: _Slot) -> None:
        """Start a new incarnation of `slot` and wait until it reports started.

        Raises:
            ChildStartError: the child raised (chained) or returned before it started.
        """
        ctx = self._require_ctx()
        slot.incarnation += 1
        slot.scope = trio.CancelScope()
        slot.done = trio.Event()
        slot.terminating = False
        slot.killed = False
        slot.ctx = Context(self._child_path(slot.spec.name), ctx.system)
        try:
            await self._nursery_required().start(self._child_main, slot, slot.incarnation)
        except ChildStartError as exc:
            # A failed start ran for no time: it must not reset the backoff (reset_after).
            slot.started_at = trio.current_time()
            reason = ExitReason.from_exception(exc.__cause__ or exc)
            slot.ctx.mailbox.mark_exited(reason, restarting=True)
            ctx.system.emit(LifecycleEvent("start_failed", slot.ctx.path, trio.current_time(),
                                           reason))
            raise
        # It may have returned right after reporting started; its exit event is queued.
        slot.running = not slot.done.is_set()
        if slot.running:
            slot.ctx.mailbox.mark_running()  # a plain task does not mark its own mailbox
        slot.started_at = trio.current_time()
        ctx.system.emit(LifecycleEvent("started", slot.ctx.path, slot.started_at))

    async def _child_main(self, slot: _Slot, incarnation: int,
                          task_status: trio.TaskStatus[None]) -> None:
        assert slot.ctx is not None
        path = slot.ctx.path
        status = _TaskStatus(task_status)
        reason, error = NORMAL, None
        try:
            with slot.scope:
                try:
                    slot.obj = slot.spec.factory()
                    await slot.obj.run(slot.ctx, task_status=status)
                except Exception as exc:
                    cause = innermost(exc)
                    if not status.reported:
                        raise ChildStartError(path, repr(cause)) from cause
                    reason, error = ExitReason.from_exception(cause), cause
                else:
                    if not status.reported:
                        raise ChildStartError(path, "it returned before it started")
            if slot.scope.cancelled_caught:
                reason, error = (KILLED, None) if slot.killed else (SHUTDOWN, None)
        finally:
            slot.running = False
            slot.done.set()
        self._events_send.send_nowait(_Exited(slot.spec.name, incarnation, reason, error))

    async def _terminate(self, slot: _Slot) -> None:
        """Stop a running child per its shutdown spec and wait until it has exited."""
        slot.terminating = True
        if not slot.running:
            return
        assert slot.ctx is not None
        shutdown = slot.spec.shutdown
        if shutdown == "brutal":
            slot.scope.cancel()
        else:
            slot.ctx.request_stop()
            if shutdown != "infinity":
                with trio.move_on_after(int(shutdown) / 1000.0):
                    await slot.done.wait()
                slot.scope.cancel()
        await slot.done.wait()

    def _remove(self, slot: _Slot) -> None:
        ctx = self._require_ctx()
        self._slots.pop(slot.spec.name, None)
        self._pending_restart.pop(slot.spec.name, None)
        mailbox = ctx.system.mailbox(self._child_path(slot.spec.name))
        mailbox.stop()
        ctx.system.forget(mailbox.path)

    async def _stop_all(self) -> None:
        slots = list(self._slots.values())
        if self.strategy is Strategy.DYNAMIC:
            async with trio.open_nursery() as nursery:
                for slot in slots:
                    nursery.start_soon(self._stop_one, slot)
        else:
            for slot in reversed(slots):
                await self._stop_one(slot)

    async def _stop_one(self, slot: _Slot) -> None:
        await self._terminate(slot)
        ctx = self._require_ctx()
        mailbox = ctx.system.mailbox(self._child_path(slot.spec.name))
        mailbox.stop()
        ctx.system.emit(LifecycleEvent("stopped", mailbox.path, trio.current_time(), SHUTDOWN))
        if slot.spec.restart is Restart.TEMPORARY:
            # Never restarted, so nothing will look this path up again.
            ctx.system.forget(mailbox.path)

    # -- helpers ---------------------------------------------------------------------

    async def _call(self, operation: Callable[[], object]) -> object:
        await self._started.wait()
        if self._stopped:
            raise ActorExitedError(self.path, "stopped")
        call = _Call(operation, trio.Event(), [])
        self._events_send.send_nowait(call)
        await call.done.wait()
        result = call.result[0]
        if isinstance(result, _Failure):
            raise result.error
        return result

    def _refuse_calls(self) -> None:
        """Fail the control calls the ended loop will never run, and all later ones."""
        self._stopped = True
        self._started.set()
        error = ActorExitedError(self.path, "stopped")
        while True:
            try:
                event = self._events.receive_nowait()
            except trio.WouldBlock:
                return
            if isinstance(event, _Call):
                event.result.append(_Failure(error))
                event.done.set()

    def _child_path(self, name: str) -> str:
        return f"{self._require_ctx().path}/{name}"

    def _info(self, slot: _Slot) -> ChildInfo:
        state: Literal["running", "restarting", "stopped"] = (
            "running" if slot.running else
            "restarting" if slot.spec.name in self._pending_restart else "stopped")
        return ChildInfo(slot.spec.name, self._child_path(slot.spec.name), state,
                         slot.restarts, slot.spec.restart)

    def _require_ctx(self) -> Context:
        if self._ctx is None:
            raise RuntimeError("the supervisor is not running")
        return self._ctx

    def _nursery_required(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery


class _Failure(msgspec.Struct, frozen=True):
    error: BaseException


class _TaskStatus:
    """The task_status a child sees: remembers whether `started()` was called."""

    __slots__ = ("_inner", "reported")

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self._inner = inner
        self.reported = False

    def started(self, value: None = None) -> None:
        self.reported = True
        self._inner.started()


def supervisor_spec(name: str, supervisor_factory: Callable[[], Supervisor], *,
                    restart: Restart = Restart.PERMANENT,
                    significant: bool = False) -> ChildSpec:
    """A ChildSpec for a nested supervisor: shutdown `infinity`, as OTP defaults."""
    return ChildSpec(name=name, factory=supervisor_factory, restart=restart,
                     shutdown="infinity", significant=significant)


@asynccontextmanager
async def open_supervisor(supervisor: Supervisor, *, name: str = "root",
                          system: ActorSystem | None = None) -> AsyncIterator[Supervisor]:
    """Run `supervisor` as the root of a tree for the duration of the block.

    Leaving the block stops the tree gracefully (children in reverse start order). If the
    root escalates, the block is cancelled and EscalationError, with the chain of
    reasons, is raised from the `async with`.

    Raises:
        EscalationError: the root exceeded its restart intensity.
        ChildStartError: a child's initial start failed (the tree never started).
    """
    system = system or ActorSystem()
    ctx = Context(name, system)
    failure: list[CorralError] = []

    async def run_root(task_status: trio.TaskStatus[None]) -> None:
        try:
            await supervisor.run(ctx, task_status=task_status)
        except EscalationError as exc:
            failure.append(exc)
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(run_root)
            except ChildStartError as exc:
                # Raised below, outside the nursery, as itself, not in an exception group.
                failure.append(exc)
            else:
                try:
                    yield supervisor
                finally:
                    ctx.request_stop()
    except BaseExceptionGroup as group:
        # The block's own error comes back as itself: the nursery is ours, not the caller's.
        leaf = innermost(group)
        if leaf is group or isinstance(leaf, trio.Cancelled):
            raise
        raise leaf from group
    if failure:
        raise failure[0]
