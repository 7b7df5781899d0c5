"""A supervisor's bookkeeping: the slot of one child position, the events its loop takes
(exits, due restarts, control calls, a stop), and the start report a child sees.

Data a `Supervisor` keeps and passes to itself; nothing here decides a restart.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec
import trio

from corral.actors.child_spec import ChildSpec
from corral.actors.context import Child, Context
from corral.protocol.lifecycle import ExitReason


class ChildSlot:
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


class Exited(msgspec.Struct, frozen=True):
    """An incarnation of child `name` ended, with why."""

    name: str
    incarnation: int
    reason: ExitReason
    error: BaseException | None


class RestartDue(msgspec.Struct, frozen=True):
    """The backoff of a restart group has passed; `token` tells a stale one apart."""

    names: tuple[str, ...]
    token: int


class ControlCall(msgspec.Struct, frozen=True):
    """A control request from another task, run by the supervisor's own loop."""

    operation: Callable[[], object]
    done: trio.Event
    result: list[object]


class StopRequested(msgspec.Struct, frozen=True):
    """The supervisor's own stop was requested: end the loop."""


class CallFailed(msgspec.Struct, frozen=True):
    """A control call raised: the caller gets `error`, the supervisor goes on."""

    error: BaseException


class StartReport:
    """The task_status a child sees: remembers whether `started()` was called."""

    __slots__ = ("_inner", "reported")

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self._inner = inner
        self.reported = False

    def started(self, value: None = None) -> None:
        self.reported = True
        self._inner.started()
