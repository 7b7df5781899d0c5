"""The root of a supervision tree: a supervisor run for the duration of an `async with`.

Leaving the block stops the tree gracefully; an escalation from the root ends the block
with the chain of reasons. Nothing here decides restarts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from corral.actors.context import Context
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem
from corral.protocol.errors import ChildStartError, CorralError, EscalationError
from corral.protocol.lifecycle import innermost


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
