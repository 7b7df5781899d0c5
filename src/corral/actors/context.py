"""What a supervised child gets: its context (path, mailbox, system, stop request) and
the `Child` protocol a supervisor runs.

Nothing here handles messages or decides restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, final

import trio

from corral.actors.ref import ActorRef
from corral.actors.system import ActorSystem
from corral.logging import get_logger

_log = get_logger("corral.actors")


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
