"""Keep-alive: a model idle past its keep-alive is unloaded, and a request naming a
model that is configured, or that was unloaded for being idle, loads it again first
(Ollama's behaviour).

Every request holds its model (`KeepAlive.hold`) from before its model is looked up
until its stream is closed; a model with a hold, or with a stream open in the table
(one a fallback serves for another model), is never idle. Once the last hold ends,
the model is idle for the keep-alive of the request that ended last: its own
`keep_alive` (`GenerateParams`), else the model's (`generation.models[].keep_alive`),
else for good. The `IdleUnloader`, a child of the root, sleeps on trio's clock (so a
`MockClock` drives it) until the first model is due and unloads it through
`Models.unload`, under the alias's lock, only if it is still idle once the lock is held.
The state lives in `KeepAlive`, which the runtime owns, so a restarted unloader takes
it up. This module never serves a request and knows nothing of any transport.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final, final

import structlog
import trio

from corral.actors.context import Context
from corral.config import ModelConfig, RuntimeConfig
from corral.protocol.durations import KEEP_FOREVER, keep_alive_seconds
from corral.protocol.errors import CorralError
from corral.runtime.model_record import ModelRecord
from corral.runtime.models import Models

__all__ = ["BUSY_RECHECK_S", "IdleUnloader", "KeepAlive"]

BUSY_RECHECK_S: Final = 1.0
"""How soon a model that was due but had a stream open (served as another model's
fallback, which holds no keep-alive of its own) is looked at again."""

_log = structlog.get_logger("corral.runtime")


@final
class KeepAlive:
    """Which models are held by requests, since when the others are idle, and which
    can be loaded on demand.

    Args:
        config: the runtime's configuration (`generation.models[].keep_alive`, and the
            configured models, which load on demand).
        models: the runtime's models.
        busy: whether a model has a stream open now (the stream table's view).
    """

    def __init__(self, config: RuntimeConfig, models: Models,
                 busy: Callable[[str], bool]) -> None:
        self._configured = {model.alias: model for model in config.generation.models}
        self._models = models
        self._busy = busy
        self._holds: collections.Counter[str] = collections.Counter()
        self._keep: dict[str, float] = {}  # alias -> keep-alive after the last request
        self._idle: dict[str, tuple[ModelRecord, float]] = {}  # alias -> (record, since)
        self._unloaded: dict[str, ModelConfig] = {}  # unloaded for being idle
        self._changed = trio.Event()

    def default(self, alias: str) -> float:
        """The model's configured keep-alive, in seconds (negative: for good)."""
        configured = self._configured.get(alias)
        if configured is None or configured.keep_alive is None:
            return KEEP_FOREVER
        return keep_alive_seconds(configured.keep_alive)

    def loadable(self, alias: str) -> ModelConfig | None:
        """How to load `alias` on demand: it is configured, or was unloaded for being
        idle; None otherwise."""
        return self._configured.get(alias) or self._unloaded.get(alias)

    def known(self) -> list[ModelConfig]:
        """The models that load on demand and are not loaded now."""
        configs = {**self._unloaded, **self._configured}
        return [config for alias, config in configs.items()
                if alias not in self._models.by_alias]

    def forget(self, alias: str) -> None:
        """`alias` was unloaded on request: it no longer loads on demand (unless it is
        configured)."""
        self._unloaded.pop(alias, None)

    def changed(self) -> None:
        """Wake the unloader: a model was loaded, or a hold ended."""
        self._changed.set()
        self._changed = trio.Event()

    @asynccontextmanager
    async def hold(self, alias: str, keep_alive_s: float | None) -> AsyncIterator[None]:
        """Hold `alias` loaded for the block; load it first if it loads on demand and
        is not loaded. On leaving, the model's keep-alive is `keep_alive_s` (None: its
        configured one), counted from then once no other hold remains.

        Raises:
            EngineClientError: what loading it raised (ModelLoadError, say).
        """
        self._holds[alias] += 1  # before any checkpoint: the unloader sees it at once
        try:
            config = self.loadable(alias)
            if config is not None and alias not in self._models.by_alias:
                await self._models.ensure(config)
                _log.info("runtime.model_loaded_on_demand", model=alias)
            yield
        finally:
            self._holds[alias] -= 1
            if self._holds[alias] <= 0:
                del self._holds[alias]
            record = self._models.by_alias.get(alias)
            if record is not None:  # an unknown alias leaves nothing behind
                self._keep[alias] = (keep_alive_s if keep_alive_s is not None
                                     else self.default(alias))
                if alias not in self._holds:
                    self._idle[alias] = (record, trio.current_time())
                self.changed()

    def expires_at(self, alias: str) -> float | None:
        """When the loaded model `alias` is unloaded for being idle (trio's clock); None
        while it is held, or when it is kept for good or not loaded."""
        record = self._models.by_alias.get(alias)
        if record is None or self._holds[alias] > 0:
            return None
        keep = self._keep.get(alias, self.default(alias))
        if keep < 0:
            return None
        seen = self._idle.get(alias)
        if seen is None or seen[0] is not record:  # loaded since: idle from now
            seen = (record, trio.current_time())
            self._idle[alias] = seen
        return seen[1] + keep

    def _in_use(self, alias: str) -> bool:
        """Whether `alias` is not idle past its keep-alive after all (asked under the
        alias's lock, with nothing between the answer and the unload)."""
        expires = self.expires_at(alias)
        return expires is None or expires > trio.current_time() or self._busy(alias)

    async def unload_due(self) -> float:
        """Unload every model idle past its keep-alive.

        Returns:
            When the next model is due (trio's clock); `math.inf` when none is.
        """
        now = trio.current_time()
        next_due = math.inf
        for alias in list(self._models.by_alias):
            expires = self.expires_at(alias)
            if expires is None:
                continue
            if expires > now:
                next_due = min(next_due, expires)
                continue
            if self._busy(alias):
                next_due = min(next_due, now + BUSY_RECHECK_S)
                continue
            record = self._models.by_alias.get(alias)
            if record is None:  # unloaded while an earlier one was
                continue
            try:
                unloaded = await self._models.unload(
                    alias, unless=functools.partial(self._in_use, alias))
            except CorralError:  # unloaded on request while this waited for its lock
                continue
            if unloaded:
                self._unloaded[alias] = record.config
                self._idle.pop(alias, None)
                _log.info("runtime.model_unloaded_idle", model=alias,
                          keep_alive_s=self._keep.get(alias))
        return next_due

    async def wait_changed(self, deadline: float) -> None:
        """Wait until `changed()` or `deadline` (trio's clock), whichever is first."""
        with trio.move_on_at(deadline):
            await self._changed.wait()


@final
class IdleUnloader:
    """Unloads the models idle past their keep-alive: a child of the root.

    It keeps no state of its own (see `KeepAlive`), so a restart loses nothing.
    """

    def __init__(self, keep_alive: KeepAlive) -> None:
        self._keep_alive = keep_alive

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        with trio.CancelScope() as scope:
            ctx.on_stop_requested(scope.cancel)
            while not ctx.stop_requested:
                next_due = await self._keep_alive.unload_due()
                await self._keep_alive.wait_changed(next_due)
