"""Self-healing of models that failed for good.

A model whose subtree gives up (more than `restarts.max_restarts` restarts) is
failed, not gone: its circuit is held open, and it is loaded again after
`calls.circuit_breaker.recovery_timeout_ms`, then twice as long after each failed
trial, up to `restarts.reload_delay_max_ms`. Each reload is one trial load (the
half-open state); a request meanwhile gets CircuitOpen with the time until the next
trial as its retry-after (`models.held_open`). The reloads run in the `reloader`
child of the root, so a crash of theirs is supervised like any other.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import final

import structlog
import trio

from corral.actors.context import Context
from corral.actors.supervisor import Supervisor
from corral.config import RuntimeConfig
from corral.engine.loaders import resolve_model, resolve_model_now
from corral.protocol.errors import CorralError
from corral.protocol.lifecycle import ExitReason
from corral.runtime.model_record import ModelRecord
from corral.runtime.models import Models
from corral.runtime.tree import backoff_of

__all__ = ["Healer", "Reloader"]

_log = structlog.get_logger("corral.runtime")


@final
class Healer:
    """Decides when each failed model is reloaded, and reloads it.

    It holds no models: `failed` is handed the one that failed, and the `Reloader`
    (which knows the models) hands `reload` the models to load it into. So it can be
    built before the models, which report failures to it.

    Args:
        config: the runtime's configuration.
        root: the root supervisor, now (its `reloader` child runs the reloads).
    """

    def __init__(self, config: RuntimeConfig, root: Callable[[], Supervisor]) -> None:
        self._root = root
        self._backoff = backoff_of(config.calls.circuit_breaker.recovery_timeout_ms,
                                   config.restarts.reload_delay_max_ms,
                                   config.supervision.backoff.random_factor,
                                   config.supervision.backoff.reset_after_ms)
        self._rng = random.Random()

    def failed(self, model: ModelRecord, reason: ExitReason) -> None:
        """The model's subtree gave up: hold its circuit open and schedule a reload."""
        if trio.current_time() - model.ready_since >= self._backoff.reset_after:
            model.reload_streak = 0  # it served long enough: start the delays over
        model.state = "failed"
        delay = self._schedule(model)
        _log.error("runtime.model_failed", model=model.alias, reason=reason.describe(),
                   reload_in_s=round(delay, 3))
        reloader = self._root().child("reloader")
        if isinstance(reloader, Reloader):  # else it restarts, and takes this one up
            reloader.reload(model)

    def _schedule(self, model: ModelRecord) -> float:
        """Set the time of the model's next reload; returns the delay until then."""
        delay = self._backoff.delay(model.reload_streak, self._rng)
        model.reload_streak += 1
        model.reload_at = trio.current_time() + delay
        return delay

    async def reload(self, models: Models, model: ModelRecord) -> None:
        """Reload a failed model, each time after its delay, until it serves again or
        is unloaded. Each reload is a trial (half-open): one load, whose failure
        doubles the next delay, up to `restarts.reload_delay_max_ms`.

        On cancellation (the reloader stops) a trial in progress is cut short; the
        next reloader takes the model up again."""
        alias = model.alias
        if model.reload_at is None:  # a trial was cut short (its reloader restarted)
            self._schedule(model)
        while models.by_alias.get(alias) is model and model.state == "failed":
            assert model.reload_at is not None
            await trio.sleep_until(model.reload_at)
            if models.by_alias.get(alias) is not model:
                return
            model.reload_at = None
            model.reloads += 1
            model.trial_since = trio.current_time()
            try:
                # The model loaded before, so its conversion is normally in the cache:
                # answered at once (a model that is gone fails in this tick); only a
                # conversion to redo goes to a thread.
                source = resolve_model_now(model.path)
                if source is None:
                    source = await trio.to_thread.run_sync(resolve_model, model.path,
                                                           abandon_on_cancel=True)
                model.source = source
                async with models.exclusive(alias):  # never beside a load or unload
                    if models.by_alias.get(alias) is not model:
                        return
                    await models.stop(alias)  # what a trial cut short may have left
                    info = await models.start(model)
            except CorralError as exc:
                self._trial_ended(model)
                delay = self._schedule(model)
                _log.warning("runtime.model_reload_failed", model=alias,
                             attempt=model.reloads, error=exc.message,
                             reload_in_s=round(delay, 3))
                continue
            self._trial_ended(model)
            model.serving(info)
            _log.info("runtime.model_reloaded", model=alias, attempt=model.reloads)


    @staticmethod
    def _trial_ended(model: ModelRecord) -> None:
        """Keep how long the trial took: the next one is told to wait about as long."""
        if model.trial_since is not None:
            model.trial_seconds = trio.current_time() - model.trial_since
            model.trial_since = None


@final
class Reloader:
    """Reloads the models that failed for good: a child of the root.

    It keeps no state: the models' records say which reloads are due and when, so an
    incarnation started after a crash takes them all up.
    """

    def __init__(self, healer: Healer, models: Models) -> None:
        self._healer = healer
        self._models = models
        self._nursery: trio.Nursery | None = None

    def reload(self, model: ModelRecord) -> None:
        """Reload `model`, failed, at its `reload_at`, until it serves or is unloaded."""
        assert self._nursery is not None
        self._nursery.start_soon(self._healer.reload, self._models, model)

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for model in [m for m in self._models.by_alias.values() if m.state == "failed"]:
                self.reload(model)
            task_status.started()
            await ctx.wait_stop_requested()
            nursery.cancel_scope.cancel()
