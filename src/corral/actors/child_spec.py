"""What a supervisor is told and what it reports: restart types, strategies, child
specs, restart intensity and backoff, child info and statistics.

Plain values: nothing here starts, watches or restarts anything.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import Literal

import msgspec

from corral.actors.context import Child
from corral.resilience.backoff import base_delay, spread


class Restart(enum.StrEnum):
    """When a child that exits is restarted (OTP's restart types)."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after an abnormal exit (an error)
    TEMPORARY = "temporary"  # never


class Strategy(enum.StrEnum):
    """Which children restart when one exits (OTP's strategies, and a dynamic one)."""

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
    """One child as its supervisor reports it (`which_children`)."""

    name: str
    path: str
    state: Literal["running", "restarting", "stopped"]
    restarts: int
    restart: Restart


class SupervisorStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one supervisor: its children and its restarts."""

    path: str
    strategy: str
    children: list[ChildInfo]
    restarts_in_window: int
    total_restarts: int
