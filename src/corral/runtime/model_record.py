"""What the runtime knows of one loaded model, and what a request to it gets while it
is failed: the record the tree's factories read back after a restart. Holds no actor
and does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec
import trio

from corral.config import ModelConfig
from corral.engine.api import EngineStatistics
from corral.protocol.errors import CircuitBreakerOpenError
from corral.protocol.messages import EngineStep, ModelInfo, PrefixCacheStatistics
from corral.runtime.health import ModelState

__all__ = ["ModelRecord", "held_open", "prefix_cache_totals"]


class ModelRecord:
    """The runtime's record of a loaded model (read back by the tree's factories).

    `path` is what the user gave; `source` the local directory it resolved to. While
    the model is failed, `reload_at` is the time of its next reload (None while one
    runs) and `reload_streak` the reloads that failed in a row, which sets the delay;
    `trial_since` is when the reload that runs began, and `trial_seconds` how long the
    last one took, failed or not. `restarting_since` is when its model actor last
    exited, until it is ready again. `prefix_cache_ended` sums the prefix cache
    counters of its engines that have ended (see `prefix_cache_totals`).
    """

    __slots__ = ("alias", "config", "info", "monitors", "path", "prefix_cache_ended",
                 "ready_since", "reload_at", "reload_streak", "reloads", "restarting_since",
                 "source", "state", "step_listeners", "trial_seconds", "trial_since")

    def __init__(self, config: ModelConfig, source: str) -> None:
        self.config = config
        self.alias = config.alias
        self.path = config.path
        self.source = source
        self.info: ModelInfo | None = None
        self.state: ModelState = "loading"
        self.step_listeners: list[Callable[[EngineStep], None]] = []
        self.monitors: list[Callable[[], None]] = []  # removers of this model's monitors
        self.reloads = 0
        self.reload_streak = 0
        self.reload_at: float | None = None
        self.ready_since = -math.inf
        self.restarting_since: float | None = None
        self.trial_since: float | None = None
        self.trial_seconds: float | None = None
        self.prefix_cache_ended = PrefixCacheStatistics()

    @property
    def in_trial(self) -> bool:
        """A load decides whether the model serves at all (its first load, or a reload
        of a failed model): its failure is an answer, not a restart."""
        return self.state in ("loading", "failed")

    def unwatch(self) -> None:
        for remove in self.monitors:
            remove()
        self.monitors.clear()

    def engine_ended(self, last: EngineStatistics) -> None:
        """An incarnation of the model actor exited with these engine statistics."""
        self.prefix_cache_ended = prefix_cache_totals(self.prefix_cache_ended,
                                                      last.prefix_cache)

    def ready(self, info: ModelInfo) -> None:
        """The model actor (re)loaded the model."""
        self.info = info
        self.restarting_since = None
        if self.state != "failed":
            self.state = "ready"

    def serving(self, info: ModelInfo) -> None:
        """A trial load (first load or reload) succeeded: the model serves."""
        self.info = info
        self.state = "ready"
        self.ready_since = trio.current_time()


# What PrefixCacheStatistics counts since an engine started; its other fields say how
# the cache is now.
_PREFIX_CACHE_COUNTERS = ("queries", "hits", "evictions", "disk_writes", "disk_loads",
                          "disk_hit_tokens", "disk_errors")


def prefix_cache_totals(ended: PrefixCacheStatistics,
                        live: PrefixCacheStatistics | None) -> PrefixCacheStatistics:
    """A model's prefix cache over its life: the counters of its engines that ended
    (`ended`) plus the live engine's, and the live engine's state (memory and disk held
    now, nothing while no engine runs). So a counter never goes down at a restart, and
    no engine's work is counted twice: an engine's counters move to `ended` as it ends,
    and from then on nobody reads it live."""
    now = live if live is not None else PrefixCacheStatistics(enabled=ended.enabled)
    return msgspec.structs.replace(now, enabled=now.enabled or ended.enabled, **{
        name: getattr(ended, name) + getattr(now, name) for name in _PREFIX_CACHE_COUNTERS})


def held_open(model: ModelRecord) -> CircuitBreakerOpenError:
    """What a request to a failed model gets: the time until its next reload, or while
    a reload runs (the half-open trial), the time that trial has left if it lasts as
    long as the last one did (or the last load, before any trial), at least 1 s."""
    now = trio.current_time()
    if model.reload_at is not None:
        wait, state = model.reload_at - now, "forced_open"
    else:
        expected = (model.trial_seconds if model.trial_seconds is not None
                    else model.info.load_seconds if model.info is not None else 1.0)
        elapsed = now - model.trial_since if model.trial_since is not None else 0.0
        wait, state = max(1.0, expected - elapsed), "half_open"
    return CircuitBreakerOpenError(max(1, math.ceil(wait * 1000.0)), state, model.alias)
