"""The embedded runtime's facade, `Runtime`: the one object through which everything
outside this package uses a runtime.

A facade only: its parts (the models, the keep-alive, the request pipeline, the table
of open streams, the actor system and the tree) are built once by `open_runtime`
(`corral.runtime`) and kept private; each method hands its work to the part whose job
it is and holds no state of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, final

import msgspec

from corral.actors.child_spec import ChildSpec
from corral.actors.ref import ActorRef
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem, Listener
from corral.config import FallbackResponse, ModelConfig, RuntimeConfig
from corral.engine.api import EngineStatistics, FaultKind
from corral.protocol.codec import convert_params
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.gang import DistributedSettings
from corral.protocol.messages import (
    ChatMessage,
    Completion,
    EngineStep,
    GenerateParams,
    PrefixCacheStatistics,
)
from corral.protocol.serving_messages import GetRegistryState, InjectFault, RegistryState
from corral.resilience.breaker import CircuitBreaker
from corral.resilience.breaker_types import BreakerStatistics
from corral.resilience.budget import RetryStatistics
from corral.runtime.breaker_actor import BreakerActor
from corral.runtime.choices import ChoiceStreams, open_choices
from corral.runtime.health import (
    Health,
    ModelDescription,
    ResilienceState,
    RuntimeStatistics,
    assess,
)
from corral.runtime.keep_alive import KeepAlive
from corral.runtime.model_record import prefix_cache_totals
from corral.runtime.models import Models
from corral.runtime.requests import Requests, TokenStream
from corral.runtime.retry_actor import GetRetryStats
from corral.runtime.stream_buffers import StreamBuffer, StreamTable
from corral.runtime.tree import REGISTRY, RunningRoot, model_path

__all__ = ["Runtime"]


@final
class Runtime:
    """The embedded facade over one supervision tree. Made by `open_runtime`.

    Only a facade: its parts (the models, the request pipeline, the table of open
    streams, the actor system and the tree) are private, built once by `open_runtime`
    in dependency order, and everything outside this package goes through the methods
    below. `corral.aio.Runtime` offers the same methods to asyncio, generated from this
    class's public ones (`tests/test_aio_parity.py` checks the two surfaces match).
    """

    def __init__(self, config: RuntimeConfig, system: ActorSystem, running: RunningRoot,
                 models: Models, requests: Requests, keep_alive: KeepAlive,
                 table: StreamTable, transports: list[ChildSpec]) -> None:
        self._config = config
        self._system = system
        self._running = running
        self._models = models
        self._requests = requests
        self._keep_alive = keep_alive
        self._table = table
        self._transports = transports

    @property
    def config(self) -> RuntimeConfig:
        """The configuration the runtime runs with (read only)."""
        return self._config

    # -- the tree, for transports, operations and fault-injection tests ----------------

    def domain(self, name: str) -> Supervisor:
        """A failure domain's supervisor ("stream_registry" is an actor, not one).

        Raises:
            EngineClientError: RuntimeError (retryable) while the domain restarts.
        """
        return self._running.domain(name)

    def actor(self, path: str) -> ActorRef:
        """The ref of the actor at `path` (``root/stream_registry``,
        ``root/transport/http``, `corral.runtime.tree.model_path`...): stable across its
        restarts, to read its `statistics()` or wait for its exit."""
        return self._system.ref(path)

    def kill(self, path: str) -> None:
        """Kill the actor or supervisor at `path` at once, as an abnormal exit: its
        supervisor restarts it or not by its spec, as after a crash (Erlang's
        `exit(Pid, kill)`). For operators and fault-injection tests.

        Raises:
            EngineClientError: InvalidParams for a path outside the tree; RuntimeError
                (retryable) while a supervisor on the path restarts.
        """
        names = path.split("/")
        if len(names) < 2 or names[0] != "root":
            raise EngineClientError(Code.INVALID_PARAMS,
                                    f"path: {path!r} is not a child in the runtime's tree",
                                    {"field": "path"})
        parent = self._running.root()
        for depth, name in enumerate(names[1:-1], start=1):
            child = parent.child(name)
            if not isinstance(child, Supervisor):
                raise EngineClientError(
                    Code.RUNTIME_ERROR, f"{'/'.join(names[:depth + 1])} is not running",
                    {"path": path}, retryable=True)
            parent = child
        parent.kill_child(names[-1])

    def add_lifecycle_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every lifecycle event of the tree (started, exited,
        restarted...), in the trio thread. It must not block or raise. Returns a
        function that removes it."""
        return self._system.add_listener(listener)

    def circuit_breaker(self, alias: str) -> CircuitBreaker:
        """A model's live circuit breaker, to read (or, in tests and operations, to force
        open or reset).

        Raises:
            EngineClientError: ModelNotLoaded; RuntimeError (retryable) while the
                breaker's actor restarts.
        """
        self._models.require(alias, allow_failed=True)
        actor = self._models.live(alias, "breaker")
        if not isinstance(actor, BreakerActor):
            raise EngineClientError(Code.RUNTIME_ERROR,
                                    f"the breaker of model {alias} is restarting",
                                    {"model": alias}, retryable=True)
        return actor.breaker

    async def start_transport(self, spec: ChildSpec) -> ActorRef:
        """Start a listener (HTTP, JSON-RPC) as a child of the transport supervisor.

        The spec is kept, so a restarted transport domain starts it again.

        Raises:
            ChildStartError: the listener failed to start (a port in use, say).
        """
        ref = await self.domain("transport").start_child(spec)
        self._transports.append(spec)
        return ref

    # -- models ------------------------------------------------------------------------

    async def load_model(self, path: str, *, alias: str | None = None,
                         fallbacks: tuple[str | FallbackResponse, ...] = (),
                         chat_template: str | None = None,
                         adapter_path: str | None = None,
                         distributed: DistributedSettings | None = None) -> ModelDescription:
        """Load a model: a local directory, a Hugging Face model id already in the local
        cache (never downloaded), a GGUF file or `ollama:NAME[:TAG]` (converted once into
        corral's cache; see `corral.engine.loaders.resolve_model`).

        Waits until it is loaded; other models and callers are never blocked meanwhile.
        A model that cannot load is an answer, not a crash: no model actor restarts
        for it, and a path that leads to no model starts none at all.

        Args:
            fallbacks: aliases of loaded models to serve in its place while its breaker
                is open, then optionally `FallbackResponse` steps (a cached completion,
                a default text) for when none of them can.
            chat_template: a Jinja chat template, or the path of a file holding one,
                to use instead of the model's own (e.g. one that renders tools).
            adapter_path: a LoRA adapter directory (mlx_lm's `adapter_config.json` and
                `adapters.safetensors`) applied at load.
            distributed: serve it from a gang of processes, each holding a shard
                (see `DistributedSettings`); a rank that dies restarts the gang.

        Raises:
            EngineClientError: InvalidParams for a taken alias or unknown fallback,
                ModelLoadError when the path leads to no model or the engine cannot
                load it.
        """
        loaded = await self._models.load(path, alias=alias, fallbacks=fallbacks,
                                         chat_template=chat_template,
                                         adapter_path=adapter_path,
                                         distributed=distributed)
        self._keep_alive.changed()  # its keep-alive counts from now
        return loaded

    async def unload_model(self, alias: str) -> None:
        """Stop a model's subtree and forget it. Its open streams end with
        ModelNotLoaded (404, not retryable: the next request gets the same answer)
        carrying their partial text in `details.partial_text`; a fallback does not take
        them over. Loads and unloads of one alias run one at a time: this waits for a
        load of the alias under way. Its worker processes are reaped before it returns.

        A model unloaded this way no longer loads on demand (unless it is configured);
        one unloaded for being idle does (`corral.runtime.keep_alive`).

        Raises:
            EngineClientError: ModelNotLoaded for an unknown alias.
        """
        await self._models.unload(alias)
        self._keep_alive.forget(alias)

    def list_models(self) -> list[ModelDescription]:
        return self._models.list()

    def loadable_models(self) -> list[ModelConfig]:
        """The models not loaded now that a request naming them loads on demand: the
        configured ones, and those unloaded for being idle."""
        return self._keep_alive.known()

    def model_expires_at(self, alias: str) -> float | None:
        """When a loaded model is unloaded for being idle (trio's clock); None while a
        request holds it, when it stays loaded for good, or when it is not loaded."""
        return self._keep_alive.expires_at(alias)

    async def keep_model(self, alias: str, keep_alive: float | None) -> None:
        """Load `alias` on demand if it is not loaded (see `loadable_models`), then keep
        it loaded for `keep_alive` seconds from now (0: unload it now, negative: for
        good, None: its configured keep-alive).

        Raises:
            EngineClientError: ModelNotLoaded for a model neither loaded nor loadable;
                what loading it raised.
        """
        async with self._keep_alive.hold(alias, keep_alive):
            self._models.require(alias, allow_failed=True)

    # -- requests ----------------------------------------------------------------------

    async def tokenize(self, model: str | None, text: str, *,
                       add_special_tokens: bool = True) -> list[int]:
        return await self._requests.tokenize(model, text,
                                            add_special_tokens=add_special_tokens)

    async def tokenize_chat(self, model: str | None, messages: list[ChatMessage]) -> list[int]:
        """The token ids of chat turns as a chat request's prompt has them: rendered
        with the model's chat template (and its generation prompt), then encoded.

        Raises:
            EngineClientError: InvalidParams (no turns, NUL bytes), ModelNotLoaded,
                TokenizerError (no chat template, or it refuses the turns).
        """
        return await self._requests.tokenize_chat(model, messages)

    async def detokenize(self, model: str | None, ids: list[int]) -> str:
        return await self._requests.detokenize(model, ids)

    async def count_prompt_tokens(self, request: GenerateParams) -> int:
        """How many tokens `request`'s prompt is, as its generation would render it
        (chat template and tools included), without generating.

        Raises:
            EngineClientError: InvalidParams (naming the field), ModelNotLoaded.
        """
        return await self._requests.prompt_tokens(request)

    @asynccontextmanager
    async def generate(self, model: str | None = None, prompt: str | list[int] | None = None,
                       **params: Any) -> AsyncIterator[TokenStream]:
        """Start a generation; iterate the yielded stream for its chunks.

        Keyword arguments are those of `GenerateParams` (max_tokens, temperature, top_p,
        top_k, min_p, repetition_penalty, seed, stop, stop_token_ids, logprobs,
        top_logprobs, response_format, tools, tool_choice, messages, timeout_ms,
        request_id): a convenience over `stream`. `response_format` takes OpenAI's
        shapes, as dicts (`{"type": "json_object"}`) or `corral.protocol.grammar`
        Structs. One choice only: `generate_choices` reads `n` > 1.

        Leaving the block before the end cancels the generation: the sequence leaves
        the batch at the next engine step. So does cancelling the enclosing scope.

        Raises:
            EngineClientError: InvalidParams (naming the field), ModelNotLoaded,
                GuidanceError (a response_format that cannot be compiled).
            CircuitBreakerOpenError: the model's breaker is open and no fallback is.
            OverloadedError: the registry is full.
            TimeoutError: the deadline passed (from the block or from the loop).
        """
        request = convert_params({**params, "model": model, "prompt": prompt}, GenerateParams)
        async with self._requests.open_stream(request) as stream:
            yield stream

    def stream(self, request: GenerateParams) -> AbstractAsyncContextManager[TokenStream]:
        """`generate` for a request already typed: `async with rt.stream(params) as
        stream`."""
        return self._requests.open_stream(request)

    @asynccontextmanager
    async def generate_choices(self, model: str | None = None,
                               prompt: str | list[int] | None = None,
                               **params: Any) -> AsyncIterator[ChoiceStreams]:
        """`generate` for `n` choices (keyword `n`, 1 to 8): each chunk names its
        `choice`, and the last chunk of each choice carries its `finish_reason`. Leaving
        the block, or one choice failing, ends them all. See `corral.runtime.choices`.
        """
        request = convert_params({**params, "model": model, "prompt": prompt}, GenerateParams)
        async with open_choices(self._requests, request) as choices:
            yield choices

    def choices(self, request: GenerateParams | Sequence[GenerateParams]
                ) -> AbstractAsyncContextManager[ChoiceStreams]:
        """`generate_choices` for a request already typed (what the transports build
        once): `async with rt.choices(params) as choices`; or for a batch of requests
        that differ in their prompt (a completion's prompts), numbered prompt by prompt."""
        return open_choices(self._requests, request)

    async def complete(self, model: str | None = None, prompt: str | list[int] | None = None,
                       **params: Any) -> Completion:
        """Generate to the end and return the whole completion; see `generate`.

        Cancelling the caller cancels the generation at the next engine step.
        """
        request = convert_params({**params, "model": model, "prompt": prompt}, GenerateParams)
        return await self.run(request)

    async def run(self, request: GenerateParams) -> Completion:
        """`complete` for a request already typed; `n` choices in `choices`."""
        async with open_choices(self._requests, request) as choices:
            return await choices.completion()

    @property
    def draining(self) -> bool:
        return self._requests.draining

    async def drain(self, timeout: float) -> int:
        """Stop admitting, let open streams finish for up to `timeout` seconds, then end
        the rest with a typed, retryable ServerError (`details.shutting_down`).

        Returns:
            How many streams were cut off at the timeout.
        """
        return await self._requests.drain(timeout)

    # -- health and statistics ---------------------------------------------------------

    def health(self) -> Health:
        models = self.list_models()
        return assess(self._system, models, draining=self.draining,
                      progress={m.alias: self._models.progress(m.alias) for m in models},
                      active_streams=len(self._table.open_buffers()),
                      restart_limit_s=(self._config.restarts.delay_max_ms
                                       + self._config.python_runtime.startup_timeout_ms)
                      / 1000.0)

    async def registry_state(self, *, timeout: float | None = None) -> RegistryState:
        """Running and waiting streams, as the registry counts them."""
        state: RegistryState = await self._system.ref(REGISTRY).ask(
            GetRegistryState(), timeout=timeout)
        return state

    async def retry_statistics(self, alias: str, *,
                               timeout: float | None = None) -> RetryStatistics:
        """The retry statistics of one model (reset when its retry actor restarts)."""
        self._models.require(alias)
        stats: RetryStatistics = await self._model_ref(alias, "retry").ask(
            GetRetryStats(), timeout=timeout)
        return stats

    async def statistics(self) -> RuntimeStatistics:
        actors = {path: msgspec.to_builtins(self._system.mailbox(path).statistics())
                  for path in self._system.paths()}
        return RuntimeStatistics(actors=actors, registry=await self.registry_state(),
                                 prefix_cache=self.prefix_cache_statistics(),
                                 resilience=self.resilience())

    def resilience(self) -> ResilienceState:
        """Rolling error and success rates, latency percentiles, retries, fallbacks and
        each model's breaker: the figures of `corral.resilience.rolling`, read now."""
        rolling = self._requests.rolling
        fallbacks: dict[str, dict[str, int]] = {}
        for (model, kind), count in rolling.fallbacks_total.items():
            fallbacks.setdefault(model, {})[kind] = count
        return ResilienceState(rolling.snapshot(), self.breaker_statistics(),
                               dict(rolling.retries_total), fallbacks)

    def breaker_statistics(self) -> dict[str, BreakerStatistics]:
        """Each model's circuit breaker now; one whose actor restarts is left out."""
        breakers = {}
        for alias in self._models.by_alias:
            try:
                breakers[alias] = self.circuit_breaker(alias).statistics()
            except CorralError:
                continue  # its actor is restarting: nothing to read until it is back
        return breakers

    def prefix_cache_statistics(self) -> dict[str, PrefixCacheStatistics]:
        """Each model's prefix cache since it was loaded: counters summed over its engines
        (they never go down when a worker or engine restarts), with what the live engine
        holds now (nothing, while its actor restarts). See `prefix_cache_totals`."""
        found = {}
        for alias, record in self._models.by_alias.items():
            stats = self.engine_statistics(alias)
            found[alias] = prefix_cache_totals(
                record.prefix_cache_ended, stats.prefix_cache if stats is not None else None)
        return found

    def add_step_listener(self, alias: str,
                          listener: Callable[[EngineStep], None]) -> Callable[[], None]:
        """Call `listener` with every engine step of a model (across its restarts), in
        the trio thread, before the registry sees the step. It must not block or raise.
        Returns a function that removes it. For benchmarks and tests that count steps.
        """
        listeners = self._models.require(alias).step_listeners
        listeners.append(listener)
        return lambda: listeners.remove(listener)

    def engine_statistics(self, alias: str) -> EngineStatistics | None:
        """The live engine's statistics (with `pid` under process isolation), or None
        while the model actor restarts."""
        return self._models.engine_statistics(alias)

    def stream_buffers(self) -> list[StreamBuffer]:
        """Every stream the runtime holds now, ended ones its reader has not closed
        included: the buffers their output waits in. To read, never to write: for taps
        that follow a request's tokens (the Ray exchange) and for tests."""
        return self._table.buffers()

    async def inject_fault(self, model: str,
                           kind: FaultKind) -> None:
        """Test hook: make the model's engine fail (raise) or stall (hang) at its next
        step; with process isolation, end its worker (exit, segfault)."""
        entry = self._models.require(model)
        await self._model_ref(entry.alias).ask(InjectFault(kind))

    def _model_ref(self, alias: str, child: str = "model") -> ActorRef:
        return self._system.ref(model_path(alias, child))
