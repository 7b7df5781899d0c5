"""The model actor: one per loaded model, the owner of that model's engine.

It starts the engine (load in the background, so starting never blocks its supervisor),
hands it sequences, forwards each engine step to the stream registry, and answers
tokenizer calls. When the engine fails, the actor crashes on purpose: its supervisor
restarts it (which reloads the model), the registry hears of the exit through a monitor,
and the breaker records the failure. A load that someone waits on to learn whether the
model loads at all (a first load, a trial reload) is an answer, not a crash. It knows
nothing of HTTP or of who reads a stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio

from corral.actors.actor import Actor
from corral.actors.mailbox import Reply
from corral.actors.ref import ActorRef
from corral.config import GenerationConfig, PythonRuntimeConfig
from corral.engine.api import EngineClient, EngineStatistics, WorkerStandby, make_engine
from corral.engine.pacing import OVERRUN_FACTOR
from corral.protocol.errors import Code, CorralError, EngineClientError, OverloadedError
from corral.protocol.gang import DistributedSettings
from corral.protocol.messages import EngineSequence, EngineStep, ModelInfo
from corral.protocol.serving_messages import (
    Accepted,
    ApplyChatTemplate,
    CancelSequence,
    Detokenize,
    EngineFailed,
    EngineLoaded,
    InjectFault,
    ListSequences,
    ModelOutput,
    Ready,
    Sequences,
    Submit,
    Text,
    TokenIds,
    Tokenize,
    WaitReady,
)


class EngineCrash(RuntimeError):
    """The engine failed; raised by the model actor so that its supervisor restarts it."""


class EngineStalled(RuntimeError):
    """The engine had work and made no step for too long (the progress watchdog)."""


class EngineProgress(msgspec.Struct, frozen=True):
    """How the model's engine gets on with its work, for the watchdog and `/health`.

    Attributes:
        age_s: seconds since its last step while it had work (0 when idle).
        limit_s: how long the step now running may take before it is stalled: the
            larger of `stall_timeout_ms` and `OVERRUN_FACTOR` times its expected time.
        stalled: the watchdog found it stalled; under thread isolation the actor then
            waits for the engine thread to leave its step before it restarts.
    """

    age_s: float
    limit_s: float
    stalled: bool = False


HeldCall = Tokenize | Detokenize | ApplyChatTemplate

ModelMessage = (Submit | CancelSequence | EngineStep | EngineFailed | EngineLoaded | WaitReady
                | Tokenize | Detokenize | ApplyChatTemplate | ListSequences | InjectFault)


class ModelActor(Actor[ModelMessage]):
    """Serves one model alias through one engine: a dedicated MLX thread, or a worker
    process, as `config.isolation` says (see `corral.engine.api.make_engine`).

    Until the model is loaded, submitted sequences wait in the actor and `WaitReady`
    asks are answered when the load ends. A failed load answers every waiter with
    ModelLoadError and then crashes the actor, so that its supervisor reloads it with
    backoff; with `crash_on_failed_load=False` (the caller of a first load or of a trial
    reload waits for its outcome) it answers instead, now and at every later
    `WaitReady` and tokenizer call, and waits to be stopped.

    Args:
        alias: the model's name.
        path: the local model directory.
        config: batching, isolation and the progress watchdog's limit.
        registry: where engine steps go (the stream registry).
        python: how a worker process starts (process isolation only).
        standby: the model's worker started ahead of need, which this incarnation's
            process engine adopts (process isolation only).
        on_ready: called with the model's info once it is loaded.
        on_engine_end: called once, as this incarnation exits, with its engine's last
            statistics (so counters kept across restarts lose none of its work).
        step_listeners: observers of every step (benchmarks, tests); they never block.
        crash_on_failed_load: crash on a failed load (False: answer it instead).
        chat_template: a Jinja chat template (or the path of a file holding one) to use
            instead of the model's own.
        adapter_path: a LoRA adapter directory applied at load.
        distributed: the gang of processes that shares the model, or None.
    """

    Message = ModelMessage

    def __init__(self, alias: str, path: str, config: GenerationConfig,
                 registry: ActorRef, *, python: PythonRuntimeConfig = PythonRuntimeConfig(),
                 standby: WorkerStandby | None = None,
                 on_ready: Callable[[ModelInfo], None] | None = None,
                 on_engine_end: Callable[[EngineStatistics], None] | None = None,
                 step_listeners: Sequence[Callable[[EngineStep], None]] = (),
                 crash_on_failed_load: bool = True,
                 chat_template: str | None = None, adapter_path: str | None = None,
                 distributed: DistributedSettings | None = None) -> None:
        self.alias = alias
        self.path = path
        self._config = config
        self._python = python
        self._standby = standby
        self._registry = registry
        self._engine: EngineClient | None = None
        self._info: ModelInfo | None = None
        self._waiting: list[Reply] = []
        self._queued: list[EngineSequence] = []
        self._running: set[int] = set()
        self._exited = False
        self._engine_failed = False
        self._last_progress = 0.0
        self._stalled = False
        self._backlog = 0  # steps waiting in this mailbox for room at the registry
        self._held: list[tuple[HeldCall, Reply]] = []  # tokenizer calls during a load
        self._on_ready = on_ready
        self._on_engine_end = on_engine_end
        self._step_listeners = step_listeners
        self._crash_on_failed_load = crash_on_failed_load
        self._load_error: EngineClientError | None = None  # a load that failed for good
        self._chat_template = chat_template
        self._adapter_path = adapter_path
        self._distributed = distributed

    async def on_start(self) -> None:
        self._engine = make_engine(
            self.path, self._config, self._python, on_step=self._on_step,
            on_failure=self._on_failure, start_soon=self.start_soon, standby=self._standby,
            chat_template=self._chat_template, adapter_path=self._adapter_path,
            distributed=self._distributed)
        self.start_soon(self._load)
        self.start_soon(self._watch_progress)

    def on_exit(self) -> None:
        # Steps the old engine posted after this point belong to no one: the next
        # incarnation must never see them, or a resumed stream would get tokens twice.
        self._exited = True
        if self._engine is not None:
            if self._on_engine_end is not None:
                self._on_engine_end(self._engine.statistics())
            self._engine.close_nowait()

    async def _watch_progress(self) -> None:
        """Crash the actor when the engine has work but its step overruns its limit (see
        `EngineProgress.limit_s`): a hang is a failure, and the restart resumes its
        streams. Slow is not stuck: a step expected to be long may take long.

        A worker process is killed at the crash (`on_exit`). An engine thread cannot be
        killed: it is told to stop, and the crash waits until it has left its step, so
        that a second engine never computes beside it. Until then new work waits in
        this actor, and `/health` says why.
        """
        floor = self._config.stall_timeout_ms / 1000.0
        while True:
            await trio.sleep(floor / 4)
            progress = self.progress()
            if progress.age_s <= progress.limit_s:
                continue
            reason = (f"engine of model {self.alias} made no step for {progress.age_s:.3f}s "
                      f"(limit {progress.limit_s:.3f}s) with {len(self._running)} sequences")
            self._stalled = self._engine_failed = True
            self.ctx.log.error("model.engine_stalled", model=self.alias,
                               age_s=round(progress.age_s, 3),
                               limit_s=round(progress.limit_s, 3),
                               sequences=len(self._running))
            if self._engine is not None and self._config.isolation == "thread":
                await self._engine.close()
            raise EngineStalled(reason)

    async def on_stop(self) -> None:
        if self._engine is not None:
            await self._engine.close()

    async def _load(self) -> None:
        assert self._engine is not None
        try:
            info = await self._engine.start()
        except CorralError as exc:
            await self.ctx.ref.tell(EngineFailed(f"load failed: {exc.message}"))
            return
        await self.ctx.ref.tell(EngineLoaded(info))

    # Engine callbacks run in the trio thread (the engine posts them there), between
    # this actor's messages, never during one.
    def _on_step(self, step: EngineStep) -> None:
        """Forward a step's tokens straight to the registry: the token path takes one
        mailbox hop, not two. When the registry's mailbox is full, steps queue in this
        actor's own mailbox instead (whose handler waits for room), and keep doing so
        until that backlog is gone, so tokens are never reordered or dropped."""
        if self._exited:
            return
        self._progress(step)
        for listener in self._step_listeners:
            listener(step)
        if not self._backlog:
            try:
                self._registry.tell_nowait(ModelOutput(self.alias, step.step, step.outputs))
                return
            except OverloadedError:
                pass
        self._backlog += 1
        self._post(step)

    def _progress(self, step: EngineStep) -> None:
        self._last_progress = trio.current_time()
        for out in step.outputs:
            if out.finish_reason is not None:
                self._running.discard(out.seq_id)

    def _on_failure(self, error: BaseException) -> None:
        # From now on calls wait (held or queued) instead of hitting a dead engine; the
        # crash that follows fails them with ActorExitedError, which callers re-send to
        # the next incarnation.
        self._engine_failed = True
        self._post(EngineFailed(repr(error)))

    @property
    def _serving(self) -> bool:
        return self._info is not None and not self._engine_failed

    def _post(self, message: EngineStep | EngineFailed) -> None:
        if self._exited:
            return
        try:
            self.ctx.ref.tell_nowait(message)
        except CorralError as exc:
            self.ctx.log.error("model.engine_event_lost", error=repr(exc))

    async def handle(self, message: ModelMessage) -> Any:
        match message:
            case EngineStep():
                return await self._forward(message)
            case Submit(seq=seq):
                return self._submit(seq)
            case CancelSequence(seq_id=seq_id):
                self._cancel(seq_id)
            case EngineLoaded(info=info):
                self._loaded(info)
            case EngineFailed(error=error):
                self._fail_waiters(error)
                if self._info is None and not self._crash_on_failed_load:
                    self._answer_failed_load(error)
                    return None
                raise EngineCrash(f"engine of model {self.alias} failed: {error}")
            case WaitReady():
                if self._info is not None:
                    return Ready(self.alias, self._info)
                if self._load_error is not None:
                    raise self._load_error
                reply = self.defer_reply()
                if reply is not None:
                    self._waiting.append(reply)
            case Tokenize() | Detokenize() | ApplyChatTemplate():
                # Answered by a task of its own: a prompt that takes seconds to render
                # must not hold up the submits, cancels and steps behind it.
                reply = self.defer_reply()
                if reply is not None:
                    self.start_soon(self._answer_or_hold, message, reply)
            case ListSequences():
                return Sequences(sorted(self._running | {s.seq_id for s in self._queued}))
            case InjectFault(kind=kind):
                self._loaded_engine().inject_fault(kind)
        return None

    def _submit(self, seq: EngineSequence) -> Accepted:
        """Queue or start a sequence. Idempotent: a sequence this incarnation already
        has is not started twice (the registry's resume and a caller's re-sent submit
        after a crash may both arrive)."""
        if seq.seq_id in self._running or any(s.seq_id == seq.seq_id for s in self._queued):
            return Accepted(seq.seq_id)
        if not self._serving:
            self._queued.append(seq)
            return Accepted(seq.seq_id)
        if not self._running:
            self._last_progress = trio.current_time()
        try:
            self._loaded_engine().submit(seq)
        except EngineClientError as exc:
            if exc.code is not Code.MODEL_NOT_LOADED:
                raise
            # The engine died and its failure is on the way: the registry resumes the
            # sequence on the next incarnation.
            self._queued.append(seq)
            return Accepted(seq.seq_id)
        self._running.add(seq.seq_id)
        return Accepted(seq.seq_id)

    def _cancel(self, seq_id: int) -> None:
        self._queued = [s for s in self._queued if s.seq_id != seq_id]
        if seq_id in self._running:
            self._running.discard(seq_id)
            if self._serving:
                self._loaded_engine().cancel(seq_id)

    async def _tokenizer_call(self, message: Tokenize | Detokenize | ApplyChatTemplate) -> Any:
        engine = self._loaded_engine()
        match message:
            case Tokenize(text=text, add_special_tokens=special):
                return TokenIds(await engine.tokenize(text, special))
            case Detokenize(ids=ids):
                return Text(await engine.detokenize(ids))
            case ApplyChatTemplate(turns=turns, tools=tools, kwargs=kwargs):
                return TokenIds(await engine.apply_chat_template(turns, tools=tools,
                                                                 kwargs=kwargs))

    async def _answer_or_hold(self, message: HeldCall, reply: Reply) -> None:
        """Answer a tokenizer call, or hold it while the engine (re)loads or has just
        died: a restart is not the caller's error. Held calls are answered after the
        load, or fail with ActorExitedError at the crash (and are re-sent)."""
        if self._load_error is not None:
            reply.fail(self._load_error)
            return
        if not self._serving:
            self._held.append((message, reply))
            return
        try:
            reply.send(await self._tokenizer_call(message))
        except EngineClientError as exc:
            if exc.code is not Code.MODEL_NOT_LOADED:
                reply.fail(exc)
                return
            self._held.append((message, reply))  # the engine died under the call

    async def _answer_held(self, held: list[tuple[HeldCall, Reply]]) -> None:
        for message, reply in held:
            await self._answer_or_hold(message, reply)

    def engine_statistics(self) -> EngineStatistics | None:
        """The engine's counters (with the worker's `pid` under process isolation); None
        once this incarnation exited, when `on_engine_end` has had its last ones."""
        if self._engine is None or self._exited:
            return None
        return self._engine.statistics()

    def progress(self) -> EngineProgress:
        """How the engine gets on with its work now (see `EngineProgress`)."""
        floor = self._config.stall_timeout_ms / 1000.0
        stats = self._engine.statistics() if self._engine is not None else None
        expected = stats.step_expected_s if stats is not None else 0.0
        age = trio.current_time() - self._last_progress if self._running else 0.0
        return EngineProgress(age, max(floor, OVERRUN_FACTOR * expected), self._stalled)

    def _loaded(self, info: ModelInfo) -> None:
        self._info = info
        if self._held:
            held, self._held = self._held, []
            self.start_soon(self._answer_held, held)
        if self._on_ready is not None:
            self._on_ready(info)
        for reply in self._waiting:
            reply.send(Ready(self.alias, info))
        self._waiting.clear()
        queued, self._queued = self._queued, []
        for seq in queued:
            self._submit(seq)
        self.ctx.log.info("model.loaded", model=self.alias, path=self.path,
                          load_seconds=round(info.load_seconds, 3))

    def _fail_waiters(self, error: str) -> None:
        """Answer `WaitReady` callers: the load failed, or the engine died. Held
        tokenizer calls are left to the crash (ActorExitedError, re-sent by callers)."""
        failure = self._failure(error)
        for reply in self._waiting:
            reply.fail(failure)
        self._waiting.clear()

    def _answer_failed_load(self, error: str) -> None:
        """The load failed and the caller that waits for it decides what follows: from
        now on every call is answered with the load's ModelLoadError."""
        self._load_error = self._failure(error)
        held, self._held = self._held, []
        for _, reply in held:
            reply.fail(self._load_error)
        self.ctx.log.info("model.load_failed", model=self.alias, path=self.path, error=error)

    def _failure(self, error: str) -> EngineClientError:
        return EngineClientError(Code.MODEL_LOAD_ERROR if self._info is None
                                 else Code.GENERATION_ERROR,
                                 f"model {self.alias}: {error}",
                                 {"model": self.alias, "path": self.path}, retryable=False)

    async def _forward(self, step: EngineStep) -> None:
        """Deliver a step that found the registry's mailbox full: wait for room, also
        through a registry restart whose stash is full, so no token is lost."""
        message = ModelOutput(self.alias, step.step, step.outputs)
        try:
            while True:
                try:
                    await self._registry.tell(message)
                    return
                except OverloadedError:
                    await trio.sleep(0.005)
        finally:
            self._backlog -= 1

    def _loaded_engine(self) -> EngineClient:
        if self._engine is None or self._info is None:
            raise EngineClientError(Code.MODEL_NOT_LOADED,
                                    f"model {self.alias} is still loading",
                                    {"model": self.alias}, retryable=True)
        return self._engine
