"""The supervision tree of one runtime: the root, its failure domains, a model's subtree.

    root (one_for_one)
    ├── stream_registry                 permanent
    ├── generation (dynamic)
    │   └── model:<alias> (rest_for_one): breaker, retry, model     temporary
    ├── transport (one_for_one)         filled by `corral serve`
    ├── reloader                        permanent: reloads the models that failed for good
    └── keep_alive                      permanent: unloads the models idle past their keep-alive

This module only builds specs and finds children by path; it holds no state and never
sends an actor work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

from corral.actors.child_spec import Backoff, ChildSpec, Intensity, Restart, Strategy
from corral.actors.ref import ActorRef
from corral.actors.supervisor import Supervisor, supervisor_spec
from corral.config import RuntimeConfig
from corral.engine.api import EngineStatistics, WorkerStandby
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.gang import DistributedSettings
from corral.protocol.messages import EngineStep, ModelInfo
from corral.runtime.breaker_actor import BreakerActor
from corral.runtime.model import ModelActor
from corral.runtime.retry_actor import RetryActor
from corral.runtime.stream_buffers import StreamTable
from corral.runtime.streams import StreamRegistry

__all__ = ["REGISTRY", "RunningRoot", "backoff_of", "build_root", "domain", "model_path",
           "model_subtree_spec"]

REGISTRY = "root/stream_registry"
"""The stream registry's path."""


def model_path(alias: str, child: str = "model") -> str:
    """The path of one child (breaker, retry, model) of a model's subtree."""
    return f"root/generation/model:{alias}/{child}"


def backoff_of(min_ms: float, max_ms: float, random_factor: float, reset_ms: float) -> Backoff:
    """A `Backoff` from the config's milliseconds."""
    return Backoff(min=min_ms / 1000.0, max=max_ms / 1000.0, random_factor=random_factor,
                   reset_after=reset_ms / 1000.0)


def build_root(config: RuntimeConfig, table: StreamTable,
               model_ref: Callable[[str], ActorRef],
               generation: Callable[[], list[ChildSpec]], transports: list[ChildSpec],
               reloader: Callable[[], Any], idle_unloader: Callable[[], Any]) -> Supervisor:
    """The root supervisor. `generation()` gives the model subtrees to start (called
    again at each restart of the domain); `transports` is read at each restart too."""
    sup = config.supervision
    intensity = Intensity(sup.max_restarts, sup.period_ms / 1000.0)
    backoff = backoff_of(sup.backoff.min_ms, sup.backoff.max_ms, sup.backoff.random_factor,
                         sup.backoff.reset_after_ms)
    return Supervisor([
        ChildSpec(name="stream_registry", factory=lambda: StreamRegistry(
            config.stream_registry, table, model_ref,
            max_resumes=config.restarts.max_restarts),
            shutdown=sup.shutdown_timeout_ms),
        supervisor_spec("generation", lambda: Supervisor(
            generation(), strategy=Strategy.DYNAMIC, intensity=intensity, backoff=backoff)),
        supervisor_spec("transport", lambda: Supervisor(
            list(transports), intensity=intensity, backoff=backoff)),
        # Last, so stopped first: a reload it cuts short stops the model it started
        # through the generation domain, which must still be running then.
        ChildSpec(name="reloader", factory=reloader, shutdown="brutal"),
        # After the generation domain too: an unload it cuts short stops the model there.
        ChildSpec(name="keep_alive", factory=idle_unloader, shutdown="brutal"),
    ], strategy=Strategy.ONE_FOR_ONE, intensity=intensity, backoff=backoff)


def model_subtree_spec(config: RuntimeConfig, alias: str, source: str, *,
                       registry: ActorRef, standby_for: Callable[[str], WorkerStandby | None],
                       on_start: Callable[[], None], on_ready: Callable[[ModelInfo], None],
                       on_engine_end: Callable[[EngineStatistics], None],
                       step_listeners: list[Callable[[EngineStep], None]],
                       crash_on_failed_load: Callable[[], bool],
                       chat_template: str | None = None,
                       adapter_path: str | None = None,
                       distributed: DistributedSettings | None = None) -> ChildSpec:
    """The subtree of one model: its breaker, its retry budget and its model actor,
    restarted rest-for-one within `restarts.max_restarts`. `on_start` runs each
    time the subtree starts (to re-arm monitors); `chat_template` replaces the
    model's own, `adapter_path` is applied at load, `distributed` shares the model
    among a gang of processes (see `ModelConfig`)."""
    restarts = config.restarts
    intensity = Intensity(restarts.max_restarts, restarts.period_ms / 1000.0)
    backoff = backoff_of(restarts.delay_base_ms, restarts.delay_max_ms,
                         config.supervision.backoff.random_factor,
                         config.supervision.backoff.reset_after_ms)
    shutdown = config.supervision.shutdown_timeout_ms

    def subtree() -> Supervisor:
        on_start()
        return Supervisor([
            ChildSpec(name="breaker", factory=lambda: BreakerActor(
                alias, config.calls.circuit_breaker), shutdown=shutdown),
            ChildSpec(name="retry", factory=lambda: RetryActor(
                config.calls.retry.budget), shutdown=shutdown),
            ChildSpec(name="model", factory=lambda: ModelActor(
                alias, source, config.generation, registry,
                python=config.python_runtime, standby=standby_for(alias), on_ready=on_ready,
                on_engine_end=on_engine_end, step_listeners=step_listeners,
                chat_template=chat_template, adapter_path=adapter_path,
                distributed=distributed, crash_on_failed_load=crash_on_failed_load()),
                shutdown=shutdown),
        ], strategy=Strategy.REST_FOR_ONE, intensity=intensity, backoff=backoff)

    return supervisor_spec(f"model:{alias}", subtree, restart=Restart.TEMPORARY)


@final
class RunningRoot:
    """The root supervisor once it runs: how the parts built before the tree (the
    models, the healer, the facade) reach it. Made empty, set once by `open_runtime`
    when the tree has started.
    """

    def __init__(self) -> None:
        self._root: Supervisor | None = None

    def attach(self, root: Supervisor) -> None:
        """The root is running (called once, right after it started)."""
        assert self._root is None, "a runtime's tree starts once"
        self._root = root

    def root(self) -> Supervisor:
        """The running root.

        Raises:
            EngineClientError: RuntimeError (retryable) before the tree has started.
        """
        if self._root is None:
            raise EngineClientError(Code.RUNTIME_ERROR, "the runtime's tree is not running",
                                    retryable=True)
        return self._root

    def domain(self, name: str) -> Supervisor:
        """A failure domain's supervisor; see `domain`."""
        return domain(self.root(), name)

    def generation(self) -> Supervisor:
        """The generation domain's supervisor; see `domain`."""
        return domain(self.root(), "generation")


def domain(root: Supervisor, name: str) -> Supervisor:
    """A failure domain's supervisor.

    Raises:
        EngineClientError: RuntimeError (retryable) while the domain restarts.
    """
    child = root.child(name)
    if not isinstance(child, Supervisor):
        raise EngineClientError(Code.RUNTIME_ERROR, f"the {name} domain is restarting",
                                retryable=True)
    return child
