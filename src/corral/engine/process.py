"""The engine of one model in a worker process: `Engine`'s interface, process isolation.

`ProcessEngine` starts `python -m corral.engine.worker`, which runs the in-process
`Engine`, and speaks `corral.protocol.worker` frames with it over the worker's stdin and
stdout. A worker that dies in any way (a segfault, an abort, `os._exit`, `kill -9`, or
silence for five heartbeat intervals, after which it is killed) is one `on_failure` call
with a `WorkerExitedError`, so its owner sees it as it would a failed engine thread.

It must never leave a process behind: every worker it starts is waited for (reaped),
whether it is closed, killed, or its owner is cancelled; the worker itself exits when
its parent dies (see `corral.engine.worker`). It knows nothing of actors or supervision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final, TypeVar, final

import structlog
import trio

from corral.engine.base import (
    EngineBase,
    EngineSettings,
    FaultKind,
    ProcessEngineStatistics,
    validate_sequence,
)
from corral.engine.blas import CpuBlas
from corral.engine.gang import GangRanks
from corral.engine.pipes import WorkerPipes
from corral.engine.spawn import StartSoon, WorkerStandby, worker_command
from corral.protocol.codec import FrameError
from corral.protocol.errors import Code, EngineClientError, error_from_info
from corral.protocol.messages import EngineSequence, EngineStep, ModelInfo, PrefixCacheStatistics
from corral.protocol.serving_messages import CancelSequence, InjectFault, Submit
from corral.protocol.worker import (
    PROTOCOL_VERSION,
    Call,
    CallArgs,
    CallResult,
    ChatTemplateArgs,
    DetokenizeArgs,
    Failed,
    FromWorker,
    Heartbeat,
    Hello,
    Load,
    Loaded,
    LoadFailed,
    Shutdown,
    Step,
    TokenizeArgs,
    ToWorker,
)

__all__ = ["SILENT_HEARTBEATS", "ProcessEngine"]

_log = structlog.get_logger("corral.process_engine")

T = TypeVar("T")

SILENT_HEARTBEATS: Final = 5
"""A worker silent for this many heartbeat intervals is frozen: it is killed."""


@final
class ProcessEngine(EngineBase):
    """One model's engine in a worker process, with the interface of `Engine`.

    The worker's frames are read by a background task that `start` runs with
    `start_soon` (the owner's nursery), so callbacks run in the owner's trio thread:
    `on_step` with every step in order, `on_failure` at most once, when the worker ends
    unasked after it reported the model loaded (a failure before that is `start`'s
    error). Neither runs after `close` or `close_nowait`.

    If the owner's nursery is cancelled, the background task kills the worker and waits
    for it: a worker never outlives the task that reads it.

    Args:
        settings: the model and how to run it, sent to the worker as they are (the
            prefix cache lives in the worker).
        on_step: called with every step, in order; it must not block. If it raises,
            the worker is killed and `on_failure` gets a `WorkerExitedError`.
        on_failure: called once with a `WorkerExitedError` when the worker dies.
        start_soon: starts the frame reader task, e.g. the owner's
            `nursery.start_soon`; it must be callable until the engine is closed.
        heartbeat_interval_ms: how often the worker sends a heartbeat. A worker silent
            for `SILENT_HEARTBEATS` intervals (once loaded) is killed.
        startup_timeout_ms: the limit for starting the worker and loading the model.
        shutdown_timeout_ms: how long `close` lets the worker stop before killing it.
        python_executable: the interpreter for the worker; the running one if None.
        cpu_blas: which BLAS the worker's MLX uses (see `corral.engine.blas`).
        worker_memory_limit_mb: the worker's address space limit (see `worker_command`).
        standby: where a worker started ahead of need waits; the engine adopts it if
            one does, and has the next one started once its model is loaded. A gang
            (`settings.distributed`) starts all its ranks anew instead.
    """

    def __init__(
        self,
        settings: EngineSettings,
        *,
        on_step: Callable[[EngineStep], None],
        on_failure: Callable[[BaseException], None],
        start_soon: StartSoon,
        heartbeat_interval_ms: int = 1000,
        startup_timeout_ms: int = 60000,
        shutdown_timeout_ms: int = 5000,
        python_executable: str | None = None,
        cpu_blas: CpuBlas = "auto",
        worker_memory_limit_mb: int | None = None,
        standby: WorkerStandby | None = None,
    ) -> None:
        super().__init__(settings, on_step, on_failure)
        self._start_soon = start_soon
        self._silence_limit_s = SILENT_HEARTBEATS * heartbeat_interval_ms / 1000.0
        self._startup_timeout_s = startup_timeout_ms / 1000.0
        self._shutdown_timeout_s = shutdown_timeout_ms / 1000.0
        self._command = worker_command(python_executable, heartbeat_interval_ms, cpu_blas,
                                       worker_memory_limit_mb)
        self._standby = standby if settings.distributed is None else None
        self._ranks: GangRanks | None = None  # a gang's ranks 1 and up (`corral.engine.gang`)

        self._pipes: WorkerPipes | None = None  # from `start` on
        self._hello = trio.Event()
        self._load_answered = trio.Event()  # Loaded, LoadFailed, or the worker ended
        self._load_answer: Loaded | LoadFailed | None = None
        self._failure_reported = False
        self._engine_error: str | None = None

        self._steps = 0
        self._generation_tokens = 0
        self._submits = 0
        self._last_step_at: float | None = None
        self._hello_at: float | None = None
        self._heartbeat: Heartbeat | None = None
        self._last_heartbeat_at: float | None = None

    @property
    def pid(self) -> int | None:
        """The worker's process id, or None before `start`."""
        return None if self._pipes is None else self._pipes.process.pid

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> ModelInfo:
        """Start the worker, wait for its Hello, load the model and wait until loaded.

        Returns:
            What the load found out about the model.

        Raises:
            EngineClientError: ModelLoadError if the load failed, the worker did not
                answer within `startup_timeout_ms`, spoke another protocol version, or
                died while starting; the worker is gone (and reaped) by then.
            RuntimeError: if the engine was started before.

        On cancellation the worker is killed and reaped.
        """
        if self._pipes is not None:
            raise RuntimeError("a ProcessEngine starts once")
        problem: str | None = None
        try:
            with trio.move_on_after(self._startup_timeout_s) as startup:
                process = self._standby.take() if self._standby is not None else None
                if process is None:
                    process = await self._open_worker()
                self._pipes = WorkerPipes(process, path=self.path,
                                          silence_limit_s=self._silence_limit_s,
                                          shutdown_timeout_s=self._shutdown_timeout_s)
                self._start_soon(self._run)
                if self._ranks is not None:
                    await self._ranks.start(Load(self.settings), self._start_soon)
                await self._hello.wait()
                if process.returncode is None and not self._stopped:
                    self._send(Load(self.settings))
                await self._load_answered.wait()
                if self._ranks is not None and isinstance(self._load_answer, Loaded):
                    await self._ranks.wait_loaded()  # rank 0's load failed: theirs hang
            if startup.cancelled_caught:
                problem = f"the worker did not load it within {self._startup_timeout_s:g} s"
        except BaseException:
            await self._abandon()
            raise
        answer = self._load_answer
        if self._ranks is not None and self._ranks.load_error is not None:
            answer = LoadFailed(self._ranks.load_error)
        if isinstance(answer, Loaded):
            if self._standby is not None:
                self._standby.replenish()
            return answer.info
        if isinstance(answer, LoadFailed):
            await self.close()
            error = error_from_info(answer.error)
            raise EngineClientError(Code.MODEL_LOAD_ERROR, error.message,
                                    {**error.details, "path": self.path}) from error
        await self._abandon()
        if problem is None:
            assert self._pipes is not None
            problem = self._pipes.describe_start_end(self._command.memory_note())
        raise EngineClientError(Code.MODEL_LOAD_ERROR, f"cannot load {self.path}: {problem}",
                                {"path": self.path, "pid": self.pid})

    async def _open_worker(self) -> trio.Process:
        """Start the worker; for a gang, its rank 0, with the other ranks to start."""
        gang = self.settings.distributed
        if gang is None:
            return await self._command.open()
        self._ranks = GangRanks(self._command, gang, path=self.path,
                                silence_limit_s=self._silence_limit_s,
                                shutdown_timeout_s=self._shutdown_timeout_s,
                                on_lost=self._gang_lost)
        return await self._ranks.open_rank0()

    def _gang_lost(self, detail: str) -> None:
        """Another rank ended: rank 0 (and with it the gang) is killed for it."""
        if self._pipes is not None:
            self._pipes.kill_for("gang", detail)

    async def close(self) -> None:
        """Stop the worker and wait until it has exited and is reaped. Idempotent.

        The worker is sent Shutdown (its engine finishes the current step and drops the
        batch) and the end of stdin; if it has not exited after `shutdown_timeout_ms`
        it is killed. No callback runs after this returns, and calls still waiting fail
        with ModelNotLoaded. On cancellation the worker is killed, and still reaped.
        """
        self._request_stop()
        pipes = self._pipes
        if pipes is None:
            return
        pipes.send(Shutdown())
        pipes.finish_sending()
        if self._ranks is not None:
            self._ranks.shutdown()
        try:
            with trio.move_on_after(self._shutdown_timeout_s):
                await pipes.process.wait()
                if self._ranks is not None:
                    await self._ranks.wait_exited()
        finally:
            await self._abandon()

    def close_nowait(self) -> None:
        """Kill the worker now and close the pipes; do not wait. Idempotent.

        For owners that cannot wait (a crashed or cancelled actor's cleanup). The
        reader task reaps the worker; if it has ended already, a system task does.
        """
        self._request_stop()
        if self._pipes is not None:
            self._pipes.close_nowait()
        if self._ranks is not None:
            self._ranks.kill()

    def _request_stop(self) -> None:
        self._close_requested = True
        self._stop()

    def _stop(self) -> None:
        """Refuse further commands and fail the calls waiting for an answer."""
        if self._stopped:
            return
        self._stopped = True
        self._fail_calls()

    async def _abandon(self) -> None:
        """Kill the worker (every rank of a gang) if it runs, and wait until it is
        reaped, even if cancelled."""
        self._stop()
        if self._pipes is not None:
            await self._pipes.abandon()
        if self._ranks is not None:
            self._ranks.kill()
            with trio.CancelScope(shield=True):
                await self._ranks.wait_exited()

    # -- commands ------------------------------------------------------------------

    def submit(self, seq: EngineSequence) -> None:
        """Queue a sequence; it joins the batch at one of the worker's next steps.

        As `Engine.submit`: validated here, never blocks.

        Raises:
            EngineClientError: InvalidParams if the sequence cannot run; ModelNotLoaded
                if the engine is not serving.
        """
        info = self._require_running()
        validate_sequence(seq, info.vocab_size, structured_output=info.structured_output)
        self._submits += 1
        self._send(Submit(seq))

    def cancel(self, seq_id: int) -> None:
        """Remove a sequence from the batch at the worker's next step; never blocks.

        The sequence emits nothing more. Unknown ids, or a stopped engine, do nothing.
        """
        if not self._stopped and self._info is not None:
            self._send(CancelSequence(seq_id))

    def inject_fault(self, kind: FaultKind) -> None:
        """Test hook: ``"raise"``, ``"hang"``, ``"stuck"`` and ``"slow"`` as in
        `Engine.inject_fault`; ``"exit"`` makes the worker call ``os._exit(3)``;
        ``"segfault"`` makes it read address 0.

        Raises:
            EngineClientError: ModelNotLoaded if the engine is not serving.
        """
        self._require_running()
        self._send(InjectFault(kind))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Encode text with the model's tokenizer, in the worker.

        On cancellation the call still runs in the worker; its answer is dropped.

        Raises:
            EngineClientError: TokenizerError if the tokenizer refuses the input;
                ModelNotLoaded if the worker stops first.
        """
        return await self._worker_call(TokenizeArgs(text, add_special_tokens), list)

    async def detokenize(self, ids: list[int]) -> str:
        """Decode token ids with the model's tokenizer, in the worker.

        On cancellation the call still runs in the worker; its answer is dropped.

        Raises:
            EngineClientError: TokenizerError if an id is not in the vocabulary;
                ModelNotLoaded if the worker stops first.
        """
        return await self._worker_call(DetokenizeArgs(list(ids)), str)

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Render chat messages with the model's template (`kwargs`: more variables for
        it) and encode them, in the worker.

        On cancellation the call still runs in the worker; its answer is dropped.

        Raises:
            EngineClientError: TokenizerError if there is no template or it refuses
                the messages; ModelNotLoaded if the worker stops first.
        """
        return await self._worker_call(
            ChatTemplateArgs(messages, add_generation_prompt, tools, dict(kwargs or {})), list)

    def statistics(self) -> ProcessEngineStatistics:
        """The engine's counters as of the last frames (see `ProcessEngineStatistics`)."""
        beat = self._heartbeat
        in_pipe = self._submits - (beat.submits if beat is not None else 0)
        return ProcessEngineStatistics(
            steps=self._steps,
            active=beat.active if beat is not None else 0,
            queued=(beat.queued if beat is not None else 0) + max(0, in_pipe),
            prompt_tokens=beat.prompt_tokens if beat is not None else 0,
            generation_tokens=self._generation_tokens,
            last_step_at=self._last_step_at,
            loaded=self._info is not None and not self._stopped,
            prefix_cache=(beat.prefix_cache if beat is not None
                          else PrefixCacheStatistics()),
            step_expected_s=beat.step_expected_s if beat is not None else 0.0,
            pid=self.pid,
            hello_at=self._hello_at,
            last_heartbeat_at=self._last_heartbeat_at,
        )

    def _send(self, message: ToWorker) -> None:
        if self._pipes is not None:
            self._pipes.send(message)

    async def _worker_call(self, args: CallArgs, returns: type[T]) -> T:
        return await self._call(lambda call_id: self._send(Call(call_id, args)), returns)

    # -- the background task: frames in, frames out, and the reaping ---------------

    async def _run(self) -> None:
        pipes = self._pipes
        assert pipes is not None
        try:
            await pipes.serve(self._dispatch, watch_from=self._load_answered)
        finally:
            self._stop()
            await pipes.reap()
            if self._ranks is not None:  # never left waiting inside a collective
                self._ranks.kill()
            self._load_answered.set()
            self._hello.set()
        self._report_exit(pipes)

    def _dispatch(self, message: FromWorker) -> None:
        match message:
            case Step(step=step):
                self._deliver(step)
            case Heartbeat():
                # Its `last_step_age_s` adds nothing here: every step frame precedes it
                # in the pipe, and `_deliver` timed their arrival.
                self._heartbeat = message
                self._last_heartbeat_at = time.monotonic()
            case CallResult(call_id=call_id, value=value, error=error):
                self._answer(call_id, value, None if error is None else error_from_info(error))
            case Hello(version=version):
                if version != PROTOCOL_VERSION:
                    raise FrameError(f"the worker speaks protocol {version}, "
                                     f"not {PROTOCOL_VERSION}")
                self._hello_at = time.monotonic()
                self._hello.set()
            case Loaded(info=info):
                # Here, not in `start`: a worker that dies before `start` resumes has
                # died serving, and `_report_exit` must see that.
                self._info = info
                self._load_answer = message
                self._load_answered.set()
            case LoadFailed():
                self._load_answer = message
                self._load_answered.set()
            case Failed(error=error):
                self._engine_error = error

    def _deliver(self, step: EngineStep) -> None:
        if self._stopped:
            return
        self._steps = step.step
        self._generation_tokens += len(step.outputs)
        self._last_step_at = time.monotonic()
        self._on_step(step)

    def _report_exit(self, pipes: WorkerPipes) -> None:
        """Call `on_failure` once if the worker ended unasked after a successful start."""
        if self._close_requested or self._info is None or self._failure_reported:
            return
        self._failure_reported = True
        error = pipes.exit_error(self._engine_error)
        _log.error("process_engine.worker_exited", path=self.path, pid=error.pid,
                   returncode=error.returncode, cause=error.cause, detail=error.message)
        self._on_failure(error)
