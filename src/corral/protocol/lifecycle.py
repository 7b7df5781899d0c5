"""What the actor kernel and supervisors say about actors: exit reasons, lifecycle
events and the liveness probe; frozen msgspec Structs, no behaviour.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

ExitKind = Literal["normal", "shutdown", "error"]


class ExitReason(msgspec.Struct, frozen=True):
    """Why an actor incarnation ended.

    `normal`: its run returned; `shutdown`: its supervisor stopped or killed it;
    `error`: it raised `error` (the exception type) with `message`.
    """

    kind: ExitKind
    error: str = ""
    message: str = ""

    @property
    def abnormal(self) -> bool:
        return self.kind == "error"

    def describe(self) -> str:
        if self.kind != "error":
            return self.kind
        return f"{self.error}: {self.message}" if self.message else self.error

    @classmethod
    def from_exception(cls, exc: BaseException) -> ExitReason:
        exc = innermost(exc)
        return cls("error", type(exc).__name__, str(exc))


def innermost(exc: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups (trio nurseries
    wrap what their tasks raise), or `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


NORMAL = ExitReason("normal")
SHUTDOWN = ExitReason("shutdown")
KILLED = ExitReason("error", "Killed", "killed by its supervisor on request")

LifecycleKind = Literal["started", "exited", "restarting", "restarted", "stopped",
                        "intensity_exceeded", "start_failed"]


class LifecycleEvent(msgspec.Struct, frozen=True, tag=True):
    """One supervision event, sent to structlog and to every system listener (metrics).

    `time` is trio's clock, so tests on a MockClock see mock time.
    """

    kind: LifecycleKind
    path: str
    time: float
    reason: ExitReason | None = None
    attempt: int = 0
    delay_s: float = 0.0


class Pong(msgspec.Struct, frozen=True, tag=True):
    seq: int = 0


class Ping(msgspec.Struct, frozen=True, tag=True):
    """A liveness probe; the answer is `Pong` with the same `seq`."""

    seq: int = 0
    reply_type: ClassVar[type[Pong]] = Pong
