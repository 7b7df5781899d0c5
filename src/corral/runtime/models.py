"""The models a runtime has loaded: load, unload, watch, describe.

Each model runs as a subtree of the generation domain (see `tree`); this module keeps
the record of each one (`model_record`), which the tree's factories read back after a
restart, and the
standby worker of each model under process isolation. It never serves a request: the
request pipeline asks it which models exist and in what state.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
import trio

from corral.actors.child_spec import ChildSpec
from corral.actors.ref import ActorRef
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem
from corral.config import FallbackResponse, ModelConfig, RuntimeConfig
from corral.engine.api import (
    EngineStatistics,
    ProcessEngineStatistics,
    WorkerStandby,
    worker_command,
)
from corral.engine.loaders import resolve_model
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.gang import DistributedSettings
from corral.protocol.lifecycle import ExitReason
from corral.protocol.messages import (
    ALIAS_PATTERN,
    ModelInfo,
)
from corral.protocol.serving_messages import ModelDown, WaitReady
from corral.runtime.breaker_actor import BreakerActor
from corral.runtime.health import ModelDescription
from corral.runtime.model import EngineProgress, ModelActor
from corral.runtime.model_record import ModelRecord, held_open
from corral.runtime.tree import REGISTRY, model_path, model_subtree_spec

__all__ = ["Models", "check_alias", "default_alias"]

_log = structlog.get_logger("corral.runtime")


class Models:
    """The loaded models of one runtime, by alias.

    Args:
        config: the runtime's configuration.
        system: the actor system (for monitors, refs and mailbox statistics).
        generation: the generation domain's supervisor, now (raises while it restarts).
        on_failed: called when a model's subtree gives up for good (outside a trial).
    """

    def __init__(self, config: RuntimeConfig, system: ActorSystem, *,
                 generation: Callable[[], Supervisor],
                 on_failed: Callable[[ModelRecord, ExitReason], None]) -> None:
        self._config = config
        self._system = system
        self._generation = generation
        self._on_failed = on_failed
        self.by_alias: dict[str, ModelRecord] = {}
        self._standbys: dict[str, WorkerStandby] = {}
        self._locks: dict[str, trio.Lock] = {}

    def ref(self, alias: str, child: str = "model") -> ActorRef:
        return self._system.ref(model_path(alias, child))

    def specs(self) -> list[ChildSpec]:
        """The subtrees to start with the generation domain: every model not failed."""
        return [self.spec(m) for m in self.by_alias.values() if m.state != "failed"]

    def spec(self, model: ModelRecord) -> ChildSpec:
        return model_subtree_spec(
            self._config, model.alias, model.source, registry=self._system.ref(REGISTRY),
            standby_for=self._standby_for, on_start=lambda: self.watch(model),
            on_ready=model.ready, on_engine_end=model.engine_ended,
            step_listeners=model.step_listeners,
            chat_template=model.config.chat_template,
            adapter_path=model.config.adapter_path,
            distributed=model.config.distributed,
            crash_on_failed_load=lambda: not model.in_trial)

    # -- loading -----------------------------------------------------------------------

    @asynccontextmanager
    async def exclusive(self, alias: str) -> AsyncIterator[None]:
        """Hold the alias's lock: loads, unloads and reloads of one alias run one at a
        time, so none cuts another short or leaves a subtree or worker nobody owns.
        Other aliases are never blocked. Cancelling the wait leaves the lock as it was."""
        lock = self._locks.setdefault(alias, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(alias, None)

    async def load(self, path: str, *, alias: str | None = None,
                   fallbacks: tuple[str | FallbackResponse, ...] = (),
                   chat_template: str | None = None,
                   adapter_path: str | None = None,
                   distributed: DistributedSettings | None = None) -> ModelDescription:
        """See `Runtime.load_model`."""
        alias = check_alias(alias or default_alias(path))
        self._check_new(alias, fallbacks)
        async with self.exclusive(alias):
            return await self._load(path, alias, fallbacks, chat_template, adapter_path,
                                    distributed)

    async def ensure(self, config: ModelConfig) -> None:
        """Load the model `config` describes unless its alias is loaded (or a load of
        it, waited for here, loads it): how a request loads a model on demand.

        Raises:
            EngineClientError: as `load` does.
        """
        if config.alias in self.by_alias:
            return
        alias = check_alias(config.alias)
        async with self.exclusive(alias):
            if alias not in self.by_alias:
                await self._load(config.path, alias, config.fallbacks, config.chat_template,
                                 config.adapter_path, config.distributed)

    async def _load(self, path: str, alias: str,
                    fallbacks: tuple[str | FallbackResponse, ...],
                    chat_template: str | None,
                    adapter_path: str | None = None,
                    distributed: DistributedSettings | None = None) -> ModelDescription:
        self._check_new(alias, fallbacks)  # another load may have taken it while we waited
        # A GGUF file or an Ollama model is converted on first use: seconds, in a thread.
        source = await trio.to_thread.run_sync(resolve_model, path, abandon_on_cancel=True)
        self._check_new(alias, fallbacks)  # another load may have taken the alias meanwhile
        model = ModelRecord(ModelConfig(alias=alias, path=path, fallbacks=fallbacks,
                                        chat_template=chat_template,
                                        adapter_path=adapter_path,
                                        distributed=distributed), source)
        self.by_alias[alias] = model
        try:
            info = await self.start(model)
        except BaseException:
            self.by_alias.pop(alias, None)
            with trio.CancelScope(shield=True):
                await self.close_standbys(alias)
            raise
        model.serving(info)
        return self.describe(model)

    def _check_new(self, alias: str, fallbacks: tuple[str | FallbackResponse, ...]) -> None:
        if alias in self.by_alias:
            raise EngineClientError(Code.INVALID_PARAMS, f"alias: {alias!r} is already loaded",
                                    {"field": "alias"})
        for name in fallbacks:
            if isinstance(name, str) and name not in self.by_alias:
                raise EngineClientError(Code.INVALID_PARAMS,
                                        f"fallbacks: {name!r} is not a loaded model",
                                        {"field": "fallbacks"})

    async def start(self, model: ModelRecord) -> ModelInfo:
        """Start the model's subtree and wait for its load (a trial: a failed load is
        answered, not restarted). On any failure the subtree is stopped again.

        Raises:
            EngineClientError: ModelLoadError, with the cause's message.
        """
        alias = model.alias
        try:
            await self._generation().start_child(self.spec(model))
            ready = await self.ref(alias).ask(
                WaitReady(), timeout=self._config.python_runtime.startup_timeout_ms / 1000.0)
        except BaseException as exc:
            if self.by_alias.get(alias) is model:  # else whoever unloaded it stopped it
                with trio.CancelScope(shield=True):
                    await self.stop(alias)
            model.unwatch()
            if isinstance(exc, CorralError) and exc.code is not Code.MODEL_LOAD_ERROR:
                raise EngineClientError(Code.MODEL_LOAD_ERROR,
                                        f"model {alias} did not load: {exc.message}",
                                        {"model": alias, "path": model.path},
                                        retryable=False) from exc
            raise
        info: ModelInfo = ready.info
        return info

    def watch(self, model: ModelRecord) -> None:
        """Monitors: the registry hears of every model actor exit; `on_failed` hears
        when the model's subtree gives up for good. Replaces any earlier ones, so a
        subtree started again never reports an exit twice."""
        model.unwatch()
        alias = model.alias
        registry = self._system.ref(REGISTRY)

        def model_exited(reason: Any) -> None:
            if model.state == "ready":
                model.state = "restarting"
                model.restarting_since = trio.current_time()
            try:
                registry.tell_nowait(ModelDown(alias, reason))
            except CorralError as exc:
                _log.warning("runtime.model_down_undelivered", model=alias, error=repr(exc))

        model.monitors.append(self._system.mailbox(model_path(alias)).add_monitor(
            model_exited))

        def subtree_exited(reason: ExitReason) -> None:
            # A trial's failure (a first load, a reload) is the caller's to handle.
            if self.by_alias.get(alias) is model and reason.abnormal and not model.in_trial:
                self._on_failed(model, reason)

        model.monitors.append(self._system.mailbox(
            f"root/generation/model:{alias}").add_monitor(subtree_exited))

    async def unload(self, alias: str, *, unless: Callable[[], bool] | None = None) -> bool:
        """See `Runtime.unload_model`. Waits for a load or reload of the alias under
        way; its streams end with ModelNotLoaded (`model_unloaded`) before the subtree
        stops, and its worker and standby are reaped before this returns. Once it has
        begun, cancellation does not cut it short.

        Args:
            unless: asked once the alias's lock is held; true leaves the model loaded
                (the keep-alive's "not idle after all").

        Returns:
            Whether the model was unloaded.
        """
        self.require(alias, allow_failed=True)
        async with self.exclusive(alias):
            model = self.require(alias, allow_failed=True)  # another unload may have won
            if unless is not None and unless():
                return False
            with trio.CancelScope(shield=True):
                del self.by_alias[alias]
                model.unwatch()  # its exit below is no crash: nothing resumes elsewhere
                try:
                    self._system.ref(REGISTRY).tell_nowait(ModelDown(
                        alias, ExitReason("shutdown", message="unloaded"), unloaded=True))
                except CorralError as exc:  # a restarted registry reconciles instead
                    _log.warning("runtime.model_down_undelivered", model=alias,
                                 error=repr(exc))
                await self.stop(alias)
                await self.close_standbys(alias)
        return True

    async def stop(self, alias: str) -> None:
        """Stop the model's subtree if it runs."""
        try:
            await self._generation().terminate_child(f"model:{alias}")
        except CorralError:
            pass  # never started, or already gone with its generation domain

    # -- standby workers ---------------------------------------------------------------

    def _standby_for(self, alias: str) -> WorkerStandby | None:
        """The model's standby worker (process isolation with `standby_worker`)."""
        py = self._config.python_runtime
        if self._config.generation.isolation != "process" or not py.standby_worker:
            return None
        if alias not in self._standbys:
            self._standbys[alias] = WorkerStandby(
                worker_command(py.python_executable, py.heartbeat_interval_ms,
                               self._config.generation.cpu_blas, py.worker_memory_limit_mb))
        return self._standbys[alias]

    async def close_standbys(self, alias: str | None = None) -> None:
        """Stop the standby worker of `alias`, or of every model."""
        for name in [alias] if alias is not None else list(self._standbys):
            standby = self._standbys.pop(name, None)
            if standby is not None:
                await standby.aclose()

    # -- reading -------------------------------------------------------------------------

    def require(self, alias: str | None, *, allow_failed: bool = False) -> ModelRecord:
        """The model a request names (the only one, when it names none).

        Raises:
            EngineClientError: InvalidParams (no model named, several loaded),
                ModelNotLoaded.
            CircuitBreakerOpenError: the model failed for good (unless `allow_failed`).
        """
        if alias is None:
            if len(self.by_alias) == 1:
                return next(iter(self.by_alias.values()))
            raise EngineClientError(Code.INVALID_PARAMS, "model: required field missing",
                                    {"field": "model"})
        model = self.by_alias.get(alias)
        if model is None:
            raise EngineClientError(Code.MODEL_NOT_LOADED, f"model {alias!r} is not loaded",
                                    {"model": alias, "loaded": sorted(self.by_alias)})
        if model.state == "failed" and not allow_failed:
            raise held_open(model)
        return model

    def list(self) -> list[ModelDescription]:
        return [self.describe(m) for m in self.by_alias.values()]

    def describe(self, model: ModelRecord) -> ModelDescription:
        stats = self._system.mailbox(model_path(model.alias)).statistics()
        state = model.state
        if state == "ready" and stats.state != "running":
            state = "restarting"
        breaker = self.live(model.alias, "breaker")
        reload_in = None
        if state == "failed":
            breaker_state = "forced_open" if model.reload_at is not None else "half_open"
            if model.reload_at is not None:
                reload_in = max(0.0, model.reload_at - trio.current_time())
        elif isinstance(breaker, BreakerActor):
            breaker_state = breaker.breaker.state.value
        else:
            breaker_state = "restarting"
        engine = self.engine_statistics(model.alias)
        restarting_s = None
        if state == "restarting" and model.restarting_since is not None:
            restarting_s = trio.current_time() - model.restarting_since
        return ModelDescription(
            alias=model.alias, path=model.path, state=state, restarting_s=restarting_s,
            fallbacks=_fallback_names(model.config), info=model.info,
            restarts=stats.restarts, breaker=breaker_state,
            worker_pid=engine.pid if isinstance(engine, ProcessEngineStatistics) else None,
            reloads=model.reloads, reload_in_s=reload_in)

    def live(self, alias: str, child: str) -> object | None:
        """The live actor object of one child of a model's subtree, or None while it
        restarts. For reading health and statistics only: never to send it work."""
        try:
            subtree = self._generation().child(f"model:{alias}")
        except CorralError:
            return None
        return subtree.child(child) if isinstance(subtree, Supervisor) else None

    def engine_statistics(self, alias: str) -> EngineStatistics | None:
        """The live engine's statistics, or None while the model actor restarts."""
        actor = self.live(alias, "model")
        return actor.engine_statistics() if isinstance(actor, ModelActor) else None

    def progress(self, alias: str) -> EngineProgress | None:
        """How the model's engine gets on with its work; None while no actor runs it."""
        actor = self.live(alias, "model")
        return actor.progress() if isinstance(actor, ModelActor) else None


def _fallback_names(config: ModelConfig) -> list[str]:
    """The fallback aliases, then "cached" and "default" for the response steps."""
    return [*config.fallback_aliases,
            *("cached" if step.cached_ttl_ms is not None else "default"
              for step in config.fallback_responses)]


def check_alias(alias: str) -> str:
    """`alias` if it matches `ALIAS_PATTERN`: it names the model's subtree of actors,
    so a ``/`` in it would address inside another model's subtree.

    Raises:
        EngineClientError: InvalidParams naming the field ``alias``.
    """
    if re.fullmatch(ALIAS_PATTERN, alias) is None:
        raise EngineClientError(
            Code.INVALID_PARAMS,
            f"alias: {alias[:64]!r} is not a valid alias: expected a letter or digit, then "
            f"up to 127 letters, digits, '.', '_', ':' or '-' (give one with `alias`)",
            {"field": "alias"})
    return alias


def default_alias(path: str) -> str:
    """The alias a model loaded without one gets: the path's last component, without a
    ``.gguf`` suffix (``./SmolLM2-135M-Instruct.Q4_1.gguf`` is
    ``SmolLM2-135M-Instruct.Q4_1``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name[:-len(".gguf")] if name.lower().endswith(".gguf") and len(name) > 5 else name
