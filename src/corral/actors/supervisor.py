"""Supervisors: start children, watch them, restart them by strategy, give up by intensity.

Each child runs in its own cancel scope inside the supervisor's nursery, so restarting
one never cancels its siblings. A child's exit reaches the supervisor as an event with a
reason, never as an exception that tears the nursery down. When restarts exceed
`intensity` (max_restarts within period), the supervisor stops its children in reverse
start order and raises EscalationError to its own parent. This module knows nothing of
what its children do.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal, final

import trio

from corral.actors.child_spec import (
    AutoShutdown,
    Backoff,
    ChildInfo,
    ChildSpec,
    Intensity,
    Restart,
    Strategy,
    SupervisorStatistics,
)
from corral.actors.context import Child, Context
from corral.actors.ref import ActorRef
from corral.actors.supervisor_events import (
    CallFailed,
    ChildSlot,
    ControlCall,
    Exited,
    RestartDue,
    StartReport,
    StopRequested,
)
from corral.protocol.errors import (
    ActorExitedError,
    ChildStartError,
    Code,
    CorralError,
    EngineClientError,
    EscalationError,
)
from corral.protocol.lifecycle import (
    KILLED,
    NORMAL,
    SHUTDOWN,
    ExitReason,
    LifecycleEvent,
    innermost,
)


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
        self._slots: dict[str, ChildSlot] = {}
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
            slot = self._slots[spec.name] = ChildSlot(spec)
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
        ctx.on_stop_requested(lambda: self._events_send.send_nowait(StopRequested()))
        failure: CorralError | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for spec in self._initial:
                    slot = self._slots[spec.name] = ChildSlot(spec)
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
            if isinstance(event, StopRequested):
                return
            if isinstance(event, ControlCall):
                try:
                    event.result.append(await event.operation())  # type: ignore[misc]
                except Exception as exc:  # the caller gets it; the supervisor goes on
                    event.result.append(CallFailed(exc))
                event.done.set()
            elif isinstance(event, Exited):
                if await self._on_exit(event):
                    return
            elif isinstance(event, RestartDue):
                await self._restart_due(event)

    # -- exits and restarts ----------------------------------------------------------

    async def _on_exit(self, event: Exited) -> bool:
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

    def _reason_chain(self, slot: ChildSlot, event: Exited) -> tuple[str, ...]:
        if isinstance(event.error, EscalationError):
            return event.error.chain
        return (f"{self._child_path(slot.spec.name)} exited: {event.reason.describe()}",)

    def _restart_group(self, slot: ChildSlot) -> tuple[str, ...]:
        """The children restarted together with `slot`, in start order."""
        names = list(self._slots)
        if self.strategy is Strategy.ONE_FOR_ALL:
            return tuple(names)
        if self.strategy is Strategy.REST_FOR_ONE:
            return tuple(names[names.index(slot.spec.name):])
        return (slot.spec.name,)

    async def _restart_after(self, group: tuple[str, ...], token: int, delay: float) -> None:
        await trio.sleep(delay)
        self._events_send.send_nowait(RestartDue(group, token))

    async def _restart_due(self, event: RestartDue) -> None:
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
                self._events_send.send_nowait(Exited(
                    name, slot.incarnation, ExitReason.from_exception(exc.__cause__ or exc),
                    exc))
                continue
            ctx.system.emit(LifecycleEvent("restarted", self._child_path(name),
                                           trio.current_time(), attempt=slot.attempt))

    def _auto_shutdown_due(self, slot: ChildSlot) -> bool:
        if not slot.spec.significant or self.auto_shutdown == "never":
            return False
        if self.auto_shutdown == "any_significant":
            return True
        return not any(s.spec.significant for s in self._slots.values())

    # -- starting and stopping children -------------------------------------------

    async def _start(self, slot: ChildSlot) -> None:
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

    async def _child_main(self, slot: ChildSlot, incarnation: int,
                          task_status: trio.TaskStatus[None]) -> None:
        assert slot.ctx is not None
        path = slot.ctx.path
        status = StartReport(task_status)
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
        self._events_send.send_nowait(Exited(slot.spec.name, incarnation, reason, error))

    async def _terminate(self, slot: ChildSlot) -> None:
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

    def _remove(self, slot: ChildSlot) -> None:
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

    async def _stop_one(self, slot: ChildSlot) -> None:
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
        call = ControlCall(operation, trio.Event(), [])
        self._events_send.send_nowait(call)
        await call.done.wait()
        result = call.result[0]
        if isinstance(result, CallFailed):
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
            if isinstance(event, ControlCall):
                event.result.append(CallFailed(error))
                event.done.set()

    def _child_path(self, name: str) -> str:
        return f"{self._require_ctx().path}/{name}"

    def _info(self, slot: ChildSlot) -> ChildInfo:
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


def supervisor_spec(name: str, supervisor_factory: Callable[[], Supervisor], *,
                    restart: Restart = Restart.PERMANENT,
                    significant: bool = False) -> ChildSpec:
    """A ChildSpec for a nested supervisor: shutdown `infinity`, as OTP defaults."""
    return ChildSpec(name=name, factory=supervisor_factory, restart=restart,
                     shutdown="infinity", significant=significant)
