"""The supervision tree and the embedded facade: `async with open_runtime(config) as rt`.

    root (one_for_one)
    ├── stream_registry                 permanent
    ├── generation (dynamic)
    │   └── model:<alias> (rest_for_one): breaker, retry, model     temporary
    ├── transport (one_for_one)         filled by `corral serve`
    └── reloader                        permanent: reloads the models that failed for good

Every request goes: validate at the edge → the model's breaker (or a fallback while it
is open) → admission by the registry → submit with retry → tokens from the registry's
buffer. The facade holds no state a restart would need except the table of open
streams and the list of loaded models, which the tree's factories read back.

A model whose subtree gives up (more than `python_runtime.max_restarts` restarts) is
failed, not gone: its circuit is held open, and the reloader loads it again after
`json_rpc.circuit_breaker.recovery_timeout_ms`, then twice as long after each failed
trial, up to `python_runtime.reload_delay_max_ms`. A request meanwhile gets CircuitOpen with the
time until that trial as its retry-after.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal, final

import msgspec
import structlog
import trio

from corral.actors.breaker import (
    BreakerActor,
    CircuitBreaker,
    Outcome,
    Record,
    acquire_through,
)
from corral.actors.core import ActorRef, ActorSystem, Context
from corral.actors.engine import EngineStatistics
from corral.actors.model import ModelActor, engine_factory
from corral.actors.process_engine import (
    ProcessEngineStatistics,
    WorkerStandby,
    worker_command,
)
from corral.actors.retry import (
    ActorBudget,
    GetRetryStats,
    RetryActor,
    RetryPolicy,
    RetryStatistics,
)
from corral.actors.retry import call as retry_call
from corral.actors.streams import StreamBuffer, StreamChunk, StreamRegistry, StreamTable
from corral.actors.supervisor import (
    Backoff,
    ChildSpec,
    Intensity,
    Restart,
    Strategy,
    Supervisor,
    open_supervisor,
    supervisor_spec,
)
from corral.config import ModelConfig, RuntimeConfig
from corral.logging import configure_logging
from corral.protocol.errors import (
    ActorExitedError,
    CircuitBreakerOpenError,
    Code,
    CorralError,
    EngineClientError,
    TimeoutError,
)
from corral.protocol.jsonrpc import convert_params
from corral.protocol.messages import (
    Admit,
    ApplyChatTemplate,
    CancelSequence,
    CloseStream,
    Completion,
    Detokenize,
    EngineStep,
    ExitReason,
    FinishReason,
    GenerateParams,
    GetRegistryState,
    InjectFault,
    ModelDown,
    ModelInfo,
    PrefixCacheStatistics,
    RegistryState,
    Submit,
    Tokenize,
    Usage,
    WaitReady,
)

_log = structlog.get_logger("corral.runtime")

_READER_GRACE_S = 5.0

# Unless generation.max_prompt_tokens / max_tokens_limit set them: the prompt and
# max_tokens limits of a model whose config gives no context length, and the least
# max_tokens limit of any model (generation stops where the context is full anyway).
_DEFAULT_LIMIT = 4096

ModelState = Literal["loading", "ready", "restarting", "failed"]


class ModelDescription(msgspec.Struct, frozen=True):
    """A model as `/health` and `list_models` show it; `worker_pid` is the process its
    engine runs in under process isolation (None in thread isolation, or restarting).

    A failed model is reloaded: `reloads` counts the attempts so far, and
    `reload_in_s` is the time until the next one (None while one runs, and unless
    the model failed); `breaker` is "forced_open" while it waits, "half_open" while a
    reload runs.
    """

    alias: str
    path: str
    state: ModelState
    fallbacks: list[str]
    info: ModelInfo | None
    restarts: int
    breaker: str
    worker_pid: int | None = None
    reloads: int = 0
    reload_in_s: float | None = None


class DomainHealth(msgspec.Struct, frozen=True):
    name: str
    state: str
    restarts: int


class Health(msgspec.Struct, frozen=True):
    """Each failure domain, each model, and whether the runtime can serve.

    `ok` is False when a domain is down or a model has failed for good.
    """

    ok: bool
    domains: list[DomainHealth]
    models: list[ModelDescription]
    active_streams: int
    reasons: list[str]


class RuntimeStatistics(msgspec.Struct, frozen=True):
    """Every actor's mailbox statistics, the stream registry's state, and each model's
    prefix cache counters (those of its engine now: they restart with the engine)."""

    actors: dict[str, Any]
    registry: RegistryState
    prefix_cache: dict[str, PrefixCacheStatistics] = {}


class _Model:
    """The runtime's record of a loaded model (read back by the tree's factories).

    `path` is what the user gave; `source` the local directory it resolved to. While
    the model is failed, `reload_at` is the time of its next reload (None while one
    runs) and `reload_streak` the reloads that failed in a row, which sets the delay.
    """

    __slots__ = ("alias", "config", "info", "monitors", "path", "ready_since", "reload_at",
                 "reload_streak", "reloads", "source", "state", "step_listeners")

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

    @property
    def in_trial(self) -> bool:
        """A load decides whether the model serves at all (its first load, or a reload
        of a failed model): its failure is an answer, not a restart."""
        return self.state in ("loading", "failed")

    def unwatch(self) -> None:
        for remove in self.monitors:
            remove()
        self.monitors.clear()

    def ready(self, info: ModelInfo) -> None:
        """The model actor (re)loaded the model."""
        self.info = info
        if self.state != "failed":
            self.state = "ready"


@final
class TokenStream:
    """One generation as the client reads it: `async for chunk in stream`.

    After the loop, `finish_reason`, `usage` and `text` describe the whole completion.
    A stream that ends with an error raises it from the loop (a CorralError: Timeout,
    GenerationError with `details["partial_text"]`, Cancelled for an idle reader).
    """

    def __init__(self, buffer: StreamBuffer, model: str) -> None:
        self._buffer = buffer
        self.model = model

    @property
    def stream_id(self) -> int:
        return self._buffer.stream_id

    @property
    def text(self) -> str:
        return self._buffer.text

    @property
    def token_ids(self) -> list[int]:
        return list(self._buffer.tokens)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._buffer.finish_reason

    @property
    def token_times(self) -> list[float]:
        """trio time at which each token reached the stream (for TTFT and ITL)."""
        return list(self._buffer.token_times)

    @property
    def usage(self) -> Usage:
        return Usage(self._buffer.prompt_tokens, len(self._buffer.tokens),
                     self._buffer.cached_tokens)

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> StreamChunk:
        buffer = self._buffer
        # The registry ends a stream at its deadline; this backstop guarantees a reader
        # never waits forever even if the registry lost track of the stream.
        with trio.move_on_at(buffer.deadline + _READER_GRACE_S) as scope:
            chunk = await buffer.next_chunk()
        if scope.cancelled_caught:
            raise TimeoutError("generate", buffer.timeout_s, buffer.request_id,
                               trio.current_time() - buffer.started_at)
        if chunk is None:
            raise StopAsyncIteration
        return chunk


@final
class Runtime:
    """The embedded facade over one supervision tree. Made by `open_runtime`."""

    def __init__(self, config: RuntimeConfig, system: ActorSystem) -> None:
        self.config = config
        self.system = system
        self.table = StreamTable()
        self._models: dict[str, _Model] = {}
        self._transports: list[ChildSpec] = []
        self._draining = False
        self._standbys: dict[str, WorkerStandby] = {}
        self._engine_factory = engine_factory(config.generation, config.python_runtime,
                                              self._standby_for)
        self._root: Supervisor | None = None
        self._policy = RetryPolicy.from_config(config.json_rpc.retry)
        gen = config.generation
        self._default_max_tokens = gen.default_max_tokens
        self._max_prompt_tokens = gen.max_prompt_tokens
        self._max_tokens_limit = gen.max_tokens_limit
        self._reload_backoff = _backoff(config.json_rpc.circuit_breaker.recovery_timeout_ms,
                                        config.python_runtime.reload_delay_max_ms,
                                        config.supervision.backoff.random_factor,
                                        config.supervision.backoff.reset_after_ms)
        self._rng = random.Random()

    def _standby_for(self, alias: str) -> WorkerStandby | None:
        """The model's standby worker (process isolation with `standby_worker`)."""
        py = self.config.python_runtime
        if self.config.generation.isolation != "process" or not py.standby_worker:
            return None
        if alias not in self._standbys:
            self._standbys[alias] = WorkerStandby(
                worker_command(py.python_executable, py.heartbeat_interval_ms))
        return self._standbys[alias]

    async def _close_standbys(self, alias: str | None = None) -> None:
        for name in [alias] if alias is not None else list(self._standbys):
            standby = self._standbys.pop(name, None)
            if standby is not None:
                await standby.aclose()

    # -- the tree --------------------------------------------------------------------

    def _tree(self) -> Supervisor:
        sup = self.config.supervision
        intensity = Intensity(sup.max_restarts, sup.period_ms / 1000.0)
        backoff = _backoff(sup.backoff.min_ms, sup.backoff.max_ms, sup.backoff.random_factor,
                           sup.backoff.reset_after_ms)
        return Supervisor([
            ChildSpec(name="stream_registry", factory=lambda: StreamRegistry(
                self.config.stream_registry, self.table, self._model_ref,
                max_resumes=self.config.python_runtime.max_restarts),
                shutdown=sup.shutdown_timeout_ms),
            supervisor_spec("generation", lambda: Supervisor(
                [self._model_spec(m) for m in self._models.values() if m.state != "failed"],
                strategy=Strategy.DYNAMIC, intensity=intensity, backoff=backoff)),
            supervisor_spec("transport", lambda: Supervisor(
                list(self._transports), intensity=intensity, backoff=backoff)),
            # Last, so stopped first: a reload it cuts short stops the model it started
            # through the generation domain, which must still be running then.
            ChildSpec(name="reloader", factory=lambda: _Reloader(self), shutdown="brutal"),
        ], strategy=Strategy.ONE_FOR_ONE, intensity=intensity, backoff=backoff)

    def _model_spec(self, model: _Model) -> ChildSpec:
        py = self.config.python_runtime
        intensity = Intensity(py.max_restarts, py.restart_period_ms / 1000.0)
        backoff = _backoff(py.restart_delay_base_ms, py.restart_delay_max_ms,
                           self.config.supervision.backoff.random_factor,
                           self.config.supervision.backoff.reset_after_ms)
        shutdown = self.config.supervision.shutdown_timeout_ms
        alias = model.alias

        def subtree() -> Supervisor:
            self._watch(model)  # re-armed at every start, also after a domain restart
            return Supervisor([
                ChildSpec(name="breaker", factory=lambda: BreakerActor(
                    alias, self.config.json_rpc.circuit_breaker), shutdown=shutdown),
                ChildSpec(name="retry", factory=lambda: RetryActor(
                    self.config.json_rpc.retry.budget), shutdown=shutdown),
                ChildSpec(name="model", factory=lambda: ModelActor(
                    alias, model.source, self.config.generation, self._registry_ref,
                    engine_factory=self._engine_factory, on_ready=model.ready,
                    step_listeners=model.step_listeners,
                    crash_on_failed_load=not model.in_trial),
                    shutdown=shutdown),
            ], strategy=Strategy.REST_FOR_ONE, intensity=intensity, backoff=backoff)

        return supervisor_spec(f"model:{alias}", subtree, restart=Restart.TEMPORARY)

    @property
    def _registry_ref(self) -> ActorRef:
        return self.system.ref("root/stream_registry")

    def _model_ref(self, alias: str, child: str = "model") -> ActorRef:
        return self.system.ref(f"root/generation/model:{alias}/{child}")

    def _generation(self) -> Supervisor:
        return self._domain("generation")

    async def start_transport(self, spec: ChildSpec) -> ActorRef:
        """Start a listener (HTTP, JSON-RPC) as a child of the transport supervisor.

        The spec is kept, so a restarted transport domain starts it again.

        Raises:
            ChildStartError: the listener failed to start (a port in use, say).
        """
        ref = await self._domain("transport").start_child(spec)
        self._transports.append(spec)
        return ref

    def _domain(self, name: str) -> Supervisor:
        assert self._root is not None
        domain = self._root.child(name)
        if not isinstance(domain, Supervisor):
            raise EngineClientError(Code.RUNTIME_ERROR, f"the {name} domain is restarting",
                                    retryable=True)
        return domain

    # -- models ------------------------------------------------------------------------

    async def load_model(self, path: str, *, alias: str | None = None,
                         fallbacks: tuple[str, ...] = ()) -> ModelDescription:
        """Load a model: a local directory, or a Hugging Face model id already in the
        local cache (never downloaded; see `resolve_model_path`).

        Waits until it is loaded; other models and callers are never blocked meanwhile.
        A model that cannot load is an answer, not a crash: no model actor restarts
        for it, and a path that leads to no model starts none at all.

        Raises:
            EngineClientError: InvalidParams for a taken alias or unknown fallback,
                ModelLoadError when the path leads to no model or the engine cannot
                load it.
        """
        alias = alias or path.rstrip("/").rsplit("/", 1)[-1]
        if alias in self._models:
            raise EngineClientError(Code.INVALID_PARAMS, f"alias: {alias!r} is already loaded",
                                    {"field": "alias"})
        for name in fallbacks:
            if name not in self._models:
                raise EngineClientError(Code.INVALID_PARAMS,
                                        f"fallbacks: {name!r} is not a loaded model",
                                        {"field": "fallbacks"})
        model = _Model(ModelConfig(alias=alias, path=path, fallbacks=fallbacks),
                       resolve_model_path(path))
        self._models[alias] = model
        try:
            info = await self._start(model)
        except BaseException:
            self._models.pop(alias, None)
            with trio.CancelScope(shield=True):
                await self._close_standbys(alias)
            raise
        model.info = info
        model.state = "ready"
        model.ready_since = trio.current_time()
        return self._describe(model)

    async def _start(self, model: _Model) -> ModelInfo:
        """Start the model's subtree and wait for its load (a trial: a failed load is
        answered, not restarted). On any failure the subtree is stopped again.

        Raises:
            EngineClientError: ModelLoadError, with the cause's message.
        """
        alias = model.alias
        try:
            await self._generation().start_child(self._model_spec(model))
            ready = await self._model_ref(alias).ask(
                WaitReady(), timeout=self.config.python_runtime.startup_timeout_ms / 1000.0)
        except BaseException as exc:
            if self._models.get(alias) is model:  # else whoever unloaded it stopped it
                with trio.CancelScope(shield=True):
                    await self._stop_model(alias)
            model.unwatch()
            if isinstance(exc, CorralError) and exc.code is not Code.MODEL_LOAD_ERROR:
                raise EngineClientError(Code.MODEL_LOAD_ERROR,
                                        f"model {alias} did not load: {exc.message}",
                                        {"model": alias, "path": model.path},
                                        retryable=False) from exc
            raise
        return ready.info  # type: ignore[no-any-return]

    def _failed(self, model: _Model, reason: ExitReason) -> None:
        """The model's subtree gave up: hold its circuit open and schedule a reload."""
        if trio.current_time() - model.ready_since >= self._reload_backoff.reset_after:
            model.reload_streak = 0  # it served long enough: start the delays over
        model.state = "failed"
        delay = self._schedule_reload(model)
        _log.error("runtime.model_failed", model=model.alias, reason=reason.describe(),
                   reload_in_s=round(delay, 3))
        reloader = self.root.child("reloader")
        if isinstance(reloader, _Reloader):  # else it restarts, and takes this one up
            reloader.reload(model)

    def _failed_models(self) -> list[_Model]:
        return [m for m in self._models.values() if m.state == "failed"]

    def _schedule_reload(self, model: _Model) -> float:
        """Set the time of the model's next reload; returns the delay until then."""
        backoff = self._reload_backoff
        delay = min(backoff.max, backoff.delay(model.reload_streak, self._rng))
        model.reload_streak += 1
        model.reload_at = trio.current_time() + delay
        return delay

    async def _reload(self, model: _Model) -> None:
        """Reload a failed model, each time after its delay, until it serves again or
        is unloaded. Each reload is a trial (half-open): one load, whose failure
        doubles the next delay, up to `python_runtime.reload_delay_max_ms`."""
        alias = model.alias
        if model.reload_at is None:  # a trial was cut short (its reloader restarted)
            self._schedule_reload(model)
        while self._models.get(alias) is model and model.state == "failed":
            assert model.reload_at is not None
            await trio.sleep_until(model.reload_at)
            if self._models.get(alias) is not model:
                return
            model.reload_at = None
            model.reloads += 1
            try:
                model.source = resolve_model_path(model.path)
                await self._stop_model(alias)  # what a trial cut short may have left
                info = await self._start(model)
            except CorralError as exc:
                delay = self._schedule_reload(model)
                _log.warning("runtime.model_reload_failed", model=alias,
                             attempt=model.reloads, error=exc.message,
                             reload_in_s=round(delay, 3))
                continue
            model.info = info
            model.state = "ready"
            model.ready_since = trio.current_time()
            _log.info("runtime.model_reloaded", model=alias, attempt=model.reloads)

    def _watch(self, model: _Model) -> None:
        """Monitors: the registry hears of every model actor exit; the runtime hears
        when the model's subtree gives up for good. Replaces any earlier ones, so a
        subtree started again never reports an exit twice."""
        model.unwatch()
        alias = model.alias
        registry = self._registry_ref

        def model_exited(reason: Any) -> None:
            if model.state == "ready":
                model.state = "restarting"
            try:
                registry.tell_nowait(ModelDown(alias, reason))
            except CorralError as exc:
                _log.warning("runtime.model_down_undelivered", model=alias, error=repr(exc))

        model.monitors.append(self.system.mailbox(
            f"root/generation/model:{alias}/model").add_monitor(model_exited))

        def subtree_exited(reason: ExitReason) -> None:
            # A trial's failure (a first load, a reload) is the caller's to handle.
            if self._models.get(alias) is model and reason.abnormal and not model.in_trial:
                self._failed(model, reason)

        model.monitors.append(self.system.mailbox(
            f"root/generation/model:{alias}").add_monitor(subtree_exited))

    async def unload_model(self, alias: str) -> None:
        """Stop a model's subtree and forget it. Its open streams end with a
        GenerationError carrying their partial text (the model is gone, so they cannot
        resume); a fallback does not take them over.

        Raises:
            EngineClientError: ModelNotLoaded for an unknown alias.
        """
        model = self._require_model(alias, allow_failed=True)
        del self._models[alias]
        await self._stop_model(alias)
        await self._close_standbys(alias)
        model.unwatch()

    async def _stop_model(self, alias: str) -> None:
        try:
            await self._generation().terminate_child(f"model:{alias}")
        except CorralError:
            pass  # never started, or already gone with its generation domain

    def list_models(self) -> list[ModelDescription]:
        return [self._describe(m) for m in self._models.values()]

    def _describe(self, model: _Model) -> ModelDescription:
        stats = self.system.mailbox(f"root/generation/model:{model.alias}/model").statistics()
        state = model.state
        if state == "ready" and stats.state != "running":
            state = "restarting"
        breaker = self._live(model.alias, "breaker")
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
        return ModelDescription(
            alias=model.alias, path=model.path, state=state,
            fallbacks=list(model.config.fallbacks), info=model.info,
            restarts=stats.restarts, breaker=breaker_state,
            worker_pid=engine.pid if isinstance(engine, ProcessEngineStatistics) else None,
            reloads=model.reloads, reload_in_s=reload_in)

    def _live(self, alias: str, child: str) -> object | None:
        """The live actor object of one child of a model's subtree, or None while it
        restarts. For reading health and statistics only: never to send it work."""
        try:
            subtree = self._generation().child(f"model:{alias}")
        except CorralError:
            return None
        return subtree.child(child) if isinstance(subtree, Supervisor) else None

    def _require_model(self, alias: str | None, *, allow_failed: bool = False) -> _Model:
        if alias is None:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise EngineClientError(Code.INVALID_PARAMS, "model: required field missing",
                                    {"field": "model"})
        model = self._models.get(alias)
        if model is None:
            raise EngineClientError(Code.MODEL_NOT_LOADED, f"model {alias!r} is not loaded",
                                    {"model": alias, "loaded": sorted(self._models)})
        if model.state == "failed" and not allow_failed:
            raise _held_open(model)
        return model

    # -- tokenizer ---------------------------------------------------------------------

    async def tokenize(self, model: str | None, text: str, *,
                       add_special_tokens: bool = True) -> list[int]:
        entry = self._require_model(model)
        _check_text("text", text)
        reply = await self._ask_model(entry.alias, Tokenize(text, add_special_tokens))
        return list(reply.ids)

    async def detokenize(self, model: str | None, ids: list[int]) -> str:
        entry = self._require_model(model)
        reply = await self._ask_model(entry.alias, Detokenize(list(ids)))
        return str(reply.text)

    # -- generation --------------------------------------------------------------------

    @asynccontextmanager
    async def generate(self, model: str | None = None, prompt: str | list[int] | None = None,
                       **params: Any) -> AsyncIterator[TokenStream]:
        """Start a generation; iterate the yielded stream for its chunks.

        Keyword arguments are those of `GenerateParams` (max_tokens, temperature, top_p,
        top_k, min_p, repetition_penalty, seed, stop, stop_token_ids, logprobs,
        messages, timeout_ms, request_id).

        Leaving the block before the end cancels the generation: the sequence leaves
        the batch at the next engine step. So does cancelling the enclosing scope.

        Raises:
            EngineClientError: InvalidParams (naming the field), ModelNotLoaded.
            CircuitBreakerOpenError: the model's breaker is open and no fallback is.
            OverloadedError: the registry is full.
            TimeoutError: the deadline passed (from the block or from the loop).
        """
        request = convert_params({**params, "model": model, "prompt": prompt}, GenerateParams)
        async with self._open_stream(request) as stream:
            yield stream

    async def complete(self, model: str | None = None, prompt: str | list[int] | None = None,
                       **params: Any) -> Completion:
        """Generate to the end and return the whole completion; see `generate`.

        Cancelling the caller cancels the generation at the next engine step.
        """
        async with self.generate(model, prompt, **params) as stream:
            logprobs: list[float] = []
            async for chunk in stream:
                if chunk.logprobs:
                    logprobs.extend(chunk.logprobs)
            assert stream.finish_reason is not None
            return Completion(stream.stream_id, stream.model, stream.text, stream.token_ids,
                              stream.finish_reason, stream.usage,
                              logprobs if params.get("logprobs") else None)

    @asynccontextmanager
    async def _open_stream(self, request: GenerateParams) -> AsyncIterator[TokenStream]:
        if self.draining:
            raise shutting_down_error("new requests are refused")
        entry = self._require_model(request.model, allow_failed=True)
        timeout_s = (request.timeout_ms or self.config.stream_registry.default_timeout_ms) / 1000.0
        deadline = trio.current_time() + timeout_s
        alias, permit = await self._acquire(entry)
        outcome = Outcome.IGNORED
        started = trio.current_time()
        buffer: StreamBuffer | None = None
        submitted = False
        stream_id = self.table.new_id()
        try:
            # The permit was granted under a shield; a cancel that came meanwhile lands
            # here, where the finally gives the permit back.
            await trio.lowlevel.checkpoint_if_cancelled()
            prompt_ids = await self._prompt_ids(alias, request)
            serving = self._models.get(alias, entry)
            max_tokens = self._max_tokens(request, len(prompt_ids), serving)
            try:
                await self._registry_ref.ask(
                    Admit(stream_id=stream_id, model=alias, timeout_s=timeout_s,
                          prompt=prompt_ids, sampling=request.sampling(max_tokens),
                          max_tokens=max_tokens, request_id=request.request_id,
                          client=request.client),
                    timeout=max(deadline - trio.current_time(), 0.0),
                    request_id=request.request_id)
                buffer = self.table.get(stream_id)  # the registry opened it on admission
                assert buffer is not None and buffer.sequence is not None
                submitted = True
                await retry_call(self._policy, self._ask_model, alias, Submit(buffer.sequence),
                                 budget=ActorBudget(self._model_ref(alias, "retry")),
                                 deadline=deadline)
                yield TokenStream(buffer, alias)
                outcome = _outcome(buffer)
            finally:
                # Whatever happened, from admission on: the stream is closed and its
                # sequence leaves the batch (the model first: before its next step).
                opened = self.table.get(stream_id)
                if opened is None or not opened.ended:
                    if opened is not None:
                        opened.finish("cancelled")
                    self._tell_quietly(self._model_ref(alias), CancelSequence(stream_id))
                    self._tell_quietly(self._registry_ref, CloseStream(stream_id, "cancelled"))
                self.table.remove(stream_id)
        except BaseException as exc:
            # Before the submit (validation, tokenizing, admission) nothing said anything
            # about the model's health: ignored. From the submit on, the breaker's rule.
            outcome = CircuitBreaker.outcome_of(exc) if submitted else Outcome.IGNORED
            raise
        finally:
            # The breaker's slow-call measure is the time to first token, as DESIGN.md
            # says; a request that produced none is measured to its end.
            first = buffer.token_times[0] if buffer is not None and buffer.token_times else None
            duration = (first if first is not None else trio.current_time()) - started
            self._tell_quietly(self._model_ref(alias, "breaker"),
                               Record(permit, outcome, duration))

    @staticmethod
    def _tell_quietly(ref: ActorRef, message: Any) -> None:
        """Tell, from cleanup code that must not raise: a stopped or overfull target
        has nothing left to do with the message."""
        try:
            ref.tell_nowait(message)
        except CorralError as exc:
            _log.info("runtime.tell_undelivered", actor=ref.path, error=repr(exc))

    async def _ask_model(self, alias: str, message: Any) -> Any:
        """Ask the model actor; if its incarnation dies first, ask the next one.

        A model actor's crash fails the asks waiting on it with ActorExitedError at
        once, before they ran to completion, so sending the message again is safe: the
        restarting actor's mailbox stashes it until the next incarnation runs. Bounded
        by the model's restart budget; a model that failed for good answers at once.
        """
        ref = self._model_ref(alias)
        attempts = self.config.python_runtime.max_restarts + 1
        for attempt in range(1, attempts + 1):
            try:
                return await ref.ask(message)
            except ActorExitedError:
                if attempt == attempts:
                    raise
                self._require_model(alias)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _acquire(self, entry: _Model) -> tuple[str, Any]:
        """A breaker permit from the model, or from its first fallback that gives one."""
        first_error: CircuitBreakerOpenError | None = None
        for alias in (entry.alias, *entry.config.fallbacks):
            candidate = self._models.get(alias)
            if candidate is None or candidate.state == "failed":
                continue
            try:
                return alias, await acquire_through(self._model_ref(alias, "breaker"))
            except CircuitBreakerOpenError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        self._require_model(entry.alias)  # raises: held open, the model failed
        raise AssertionError("unreachable: a live model either grants or refuses a permit")

    async def _prompt_ids(self, alias: str, request: GenerateParams) -> list[int]:
        if (request.prompt is None) == (request.messages is None):
            raise EngineClientError(Code.INVALID_PARAMS,
                                    "prompt: give exactly one of prompt and messages",
                                    {"field": "prompt"})
        if request.messages is not None:
            if not request.messages:
                raise EngineClientError(Code.INVALID_PARAMS, "messages: expected at least one",
                                        {"field": "messages"})
            for index, message in enumerate(request.messages):
                _check_text(f"messages[{index}].content", message.content)
            reply = await self._ask_model(alias, ApplyChatTemplate(list(request.messages)))
            ids = list(reply.ids)
        elif isinstance(request.prompt, str):
            _check_text("prompt", request.prompt)
            if not request.prompt:
                raise EngineClientError(Code.INVALID_PARAMS, "prompt: expected a non-empty string",
                                        {"field": "prompt"})
            ids = list((await self._ask_model(alias, Tokenize(request.prompt))).ids)
        else:
            assert request.prompt is not None
            ids = list(request.prompt)
            info = self._models[alias].info
            if info is not None and any(i >= info.vocab_size for i in ids):
                raise EngineClientError(Code.INVALID_PARAMS,
                                        f"prompt: token ids must be < {info.vocab_size}",
                                        {"field": "prompt"})
        if not ids:
            raise EngineClientError(Code.INVALID_PARAMS, "prompt: expected at least one token",
                                    {"field": "prompt"})
        self._check_prompt_length(len(ids), self._models[alias].info)
        return ids

    def _check_prompt_length(self, tokens: int, info: ModelInfo | None) -> None:
        """A prompt fits generation.max_prompt_tokens when set, else the model's context
        less one token to generate.

        Raises:
            EngineClientError: InvalidParams naming the limit and the key that sets it.
        """
        context = info.max_context if info is not None else None
        limit = self._max_prompt_tokens
        if limit is not None:
            over = f"over generation.max_prompt_tokens ({limit})"
        elif context is not None:
            limit = context - 1
            over = (f"over the model's context of {context} (at most {limit}, leaving one "
                    f"token to generate; generation.max_prompt_tokens sets the limit)")
        else:
            limit = _DEFAULT_LIMIT
            over = (f"over {limit} (the model's context is unknown; "
                    f"generation.max_prompt_tokens sets the limit)")
        if tokens > limit:
            raise EngineClientError(Code.INVALID_PARAMS, f"prompt: {tokens} tokens, {over}",
                                    {"field": "prompt", "prompt_tokens": tokens,
                                     "limit": limit})

    def _max_tokens(self, request: GenerateParams, prompt_tokens: int, entry: _Model) -> int:
        """The request's max_tokens, checked against generation.max_tokens_limit when
        set, else against the model's context (or `_DEFAULT_LIMIT` when that is more,
        so that what an earlier default let through still goes through); then cut to
        what the context leaves after the prompt: generation ends where it is full.

        Raises:
            EngineClientError: InvalidParams naming the limit and the key that sets it.
        """
        max_tokens = request.max_tokens or self._default_max_tokens
        context = entry.info.max_context if entry.info else None
        limit = self._max_tokens_limit
        if limit is not None:
            over = f"over generation.max_tokens_limit ({limit})"
        elif context is not None and context >= _DEFAULT_LIMIT:
            limit = context
            over = (f"over the model's context of {context} "
                    f"(generation.max_tokens_limit sets the limit)")
        else:
            limit = _DEFAULT_LIMIT
            known = f"is {context}" if context is not None else "is unknown"
            over = (f"over {limit} (the model's context {known}; "
                    f"generation.max_tokens_limit sets the limit)")
        if max_tokens > limit:
            raise EngineClientError(Code.INVALID_PARAMS, f"max_tokens: {max_tokens}, {over}",
                                    {"field": "max_tokens", "limit": limit})
        if context is not None and prompt_tokens + max_tokens > context:
            max_tokens = max(1, context - prompt_tokens)
        return max_tokens

    # -- graceful shutdown ---------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout: float) -> int:
        """Stop admitting, let open streams finish for up to `timeout` seconds, then end
        the rest with a typed, retryable ServerError (`details.shutting_down`).

        Returns:
            How many streams were cut off at the timeout.
        """
        self._draining = True
        with trio.move_on_after(timeout):
            while self.table.open_buffers():
                await trio.sleep(0.01)
        remaining = self.table.open_buffers()
        error = shutting_down_error("the drain timeout passed")
        for buffer in remaining:
            buffer.finish("cancelled", error)
            self._tell_quietly(self._model_ref(buffer.model), CancelSequence(buffer.stream_id))
            self._tell_quietly(self._registry_ref, CloseStream(buffer.stream_id, "cancelled"))
        return len(remaining)

    # -- health and statistics ---------------------------------------------------------

    def health(self) -> Health:
        domains = []
        reasons = []
        for name in ("stream_registry", "generation", "transport"):
            stats = self.system.mailbox(f"root/{name}").statistics()
            domains.append(DomainHealth(name, stats.state, stats.restarts))
            if stats.state != "running":
                reasons.append(f"{name} is {stats.state}")
        models = self.list_models()
        for model in models:
            if model.state == "failed":
                reasons.append(f"model {model.alias} failed")
                reasons.append(f"model {model.alias} reloads in {model.reload_in_s:.1f}s"
                               if model.reload_in_s is not None
                               else f"model {model.alias} is reloading")
        if self._draining:
            reasons.append("shutting down")
        stall = self.config.generation.stall_timeout_ms / 1000.0
        for model in models:
            actor = self._live(model.alias, "model")
            age = actor.progress_age() if isinstance(actor, ModelActor) else 0.0
            if age > stall / 2:
                reasons.append(f"model {model.alias} has work but made no step for {age:.1f}s")
        return Health(ok=not reasons, domains=domains, models=models,
                      active_streams=len(self.table.open_buffers()), reasons=reasons)

    async def registry_state(self, *, timeout: float | None = None) -> RegistryState:
        """Running and waiting streams, as the registry counts them."""
        return await self._registry_ref.ask(  # type: ignore[no-any-return]
            GetRegistryState(), timeout=timeout)

    async def retry_statistics(self, alias: str, *,
                               timeout: float | None = None) -> RetryStatistics:
        """The retry statistics of one model (reset when its retry actor restarts)."""
        self._require_model(alias)
        return await self._model_ref(alias, "retry").ask(  # type: ignore[no-any-return]
            GetRetryStats(), timeout=timeout)

    async def statistics(self) -> RuntimeStatistics:
        actors = {path: msgspec.to_builtins(self.system.mailbox(path).statistics())
                  for path in self.system.paths()}
        registry = await self._registry_ref.ask(GetRegistryState())
        return RuntimeStatistics(actors=actors, registry=registry,
                                 prefix_cache=self.prefix_cache_statistics())

    def prefix_cache_statistics(self) -> dict[str, PrefixCacheStatistics]:
        """Each model's prefix cache counters, from its live engine (a model whose actor
        is restarting is left out)."""
        found = {}
        for alias in self._models:
            stats = self.engine_statistics(alias)
            if stats is not None:
                found[alias] = stats.prefix_cache
        return found

    def add_step_listener(self, alias: str,
                          listener: Callable[[EngineStep], None]) -> Callable[[], None]:
        """Call `listener` with every engine step of a model (across its restarts), in
        the trio thread, before the registry sees the step. It must not block or raise.
        Returns a function that removes it. For benchmarks and tests that count steps.
        """
        listeners = self._require_model(alias).step_listeners
        listeners.append(listener)
        return lambda: listeners.remove(listener)

    def engine_statistics(self, alias: str) -> EngineStatistics | None:
        """The live engine's statistics (with `pid` under process isolation), or None
        while the model actor restarts."""
        actor = self._live(alias, "model")
        return actor.engine_statistics() if isinstance(actor, ModelActor) else None

    async def inject_fault(self, model: str,
                           kind: Literal["raise", "hang", "exit", "segfault"]) -> None:
        """Test hook: make the model's engine fail (raise) or stall (hang) at its next
        step; with process isolation, end its worker (exit, segfault)."""
        entry = self._require_model(model)
        await self._model_ref(entry.alias).ask(InjectFault(kind))

    @property
    def root(self) -> Supervisor:
        assert self._root is not None
        return self._root


def shutting_down_error(why: str) -> EngineClientError:
    """What a request gets while `corral serve` shuts down: retry elsewhere or later."""
    return EngineClientError(Code.SERVER_ERROR, f"the server is shutting down: {why}",
                             {"shutting_down": True}, retryable=True)


def resolve_model_path(path: str) -> str:
    """The local directory a model path names: the directory itself, or the snapshot of
    a Hugging Face model id in the local cache. Reads the disk only: never the network.

    Raises:
        EngineClientError: ModelLoadError saying, in the user's words, why `path`
            leads to no model.
    """
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise _no_model(path, f"{path} has no config.json: it is not a model directory")
        return local
    if os.path.exists(local):
        raise _no_model(path, f"{path} is a file, not a model directory")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(path, "config.json")
    except HFValidationError:
        raise _no_model(path, f"no such directory {path}, and {path!r} is not a Hugging "
                              f"Face model id (org/name) either") from None
    if isinstance(cached, str):
        return os.path.dirname(cached)
    raise _no_model(path, f"no such directory {path}, and no model {path!r} in the Hugging "
                          f"Face cache at {constants.HF_HUB_CACHE} (corral does not download "
                          f"models: `hf download {path}` does)")


def _no_model(path: str, message: str) -> EngineClientError:
    return EngineClientError(Code.MODEL_LOAD_ERROR, message, {"path": path}, retryable=False)


def _held_open(model: _Model) -> CircuitBreakerOpenError:
    """What a request to a failed model gets: the time until its next reload, or while
    a reload runs (the half-open trial), about as long as its last load took."""
    if model.reload_at is not None:
        wait, state = model.reload_at - trio.current_time(), "forced_open"
    else:
        wait, state = (model.info.load_seconds if model.info is not None else 1.0), "half_open"
    return CircuitBreakerOpenError(max(1, math.ceil(wait * 1000.0)), state, model.alias)


def _backoff(min_ms: float, max_ms: float, random_factor: float, reset_ms: float) -> Backoff:
    return Backoff(min=min_ms / 1000.0, max=max_ms / 1000.0, random_factor=random_factor,
                   reset_after=reset_ms / 1000.0)


def _check_text(field: str, text: str) -> None:
    if "\x00" in text:
        raise EngineClientError(Code.INVALID_PARAMS, f"{field}: NUL bytes are not allowed",
                                {"field": field})


def _outcome(buffer: StreamBuffer) -> Outcome:
    if buffer.error is not None:
        return CircuitBreaker.outcome_of(buffer.error)
    return Outcome.SUCCESS if buffer.finish_reason in ("stop", "length") else Outcome.IGNORED


@final
class _Reloader:
    """Reloads the models that failed for good: a child of the root.

    It keeps no state: the models' records say which reloads are due and when, so an
    incarnation started after a crash takes them all up.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._nursery: trio.Nursery | None = None

    def reload(self, model: _Model) -> None:
        """Reload `model`, failed, at its `reload_at`, until it serves or is unloaded."""
        assert self._nursery is not None
        self._nursery.start_soon(self._runtime._reload, model)

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for model in self._runtime._failed_models():
                self.reload(model)
            task_status.started()
            await ctx.wait_stop_requested()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_runtime(config: RuntimeConfig | None = None, *,
                       models: Mapping[str, str] | None = None) -> AsyncIterator[Runtime]:
    """Start the supervision tree; load `config.generation.models` and `models`
    (alias → path). Leaving the block stops everything gracefully.

    Raises:
        EscalationError: the root gave up (restart intensity exceeded), with the chain.
        EngineClientError: ModelLoadError for a configured model that fails to load.
    """
    config = config or RuntimeConfig()
    if not structlog.is_configured():
        # An embedding application that configured structlog keeps its own setup.
        configure_logging(config.logging, default_level="warning")
    sup = config.supervision
    system = ActorSystem(mailbox_capacity=sup.mailbox_capacity, stash_limit=sup.stash_limit,
                         fairness_interval=sup.fairness_interval,
                         default_ask_timeout=config.json_rpc.default_timeout_ms / 1000.0)
    runtime = Runtime(config, system)
    try:
        async with open_supervisor(runtime._tree(), system=system) as root:
            runtime._root = root
            for model in config.generation.models:
                await runtime.load_model(model.path, alias=model.alias,
                                         fallbacks=model.fallbacks)
            for alias, path in (models or {}).items():
                await runtime.load_model(path, alias=alias)
            yield runtime
    finally:
        await runtime._close_standbys()

