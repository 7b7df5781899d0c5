"""The engine of one model in a worker process: `Engine`'s interface, process isolation.

`ProcessEngine` starts `python -m corral.worker`, which runs the in-process `Engine`,
and speaks `corral.protocol.worker` frames with it over the worker's stdin and stdout.
A worker that dies in any way (a segfault, an abort, `os._exit`, `kill -9`, or silence
for five heartbeat intervals, after which it is killed) is one `on_failure` call with a
`WorkerExitedError`, so its model actor exits as it would for a failed engine thread.

It must never leave a process behind: every worker it starts is waited for (reaped),
whether it is closed, killed, or its owner is cancelled; the worker itself exits when
its parent dies (see `corral.worker`). It knows nothing of actors or supervision.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, final

import structlog
import trio

from corral.actors.engine import EngineStatistics
from corral.actors.engine import validate_sequence
from corral.config import PrefixCacheConfig
from corral.protocol.codec import DecodeError, Decoder, FrameError, FrameReader, encode, frame
from corral.protocol.errors import Code, CorralError, EngineClientError, error_from_info
from corral.protocol.messages import (
    EngineSequence,
    EngineStep,
    ModelInfo,
    PrefixCacheStatistics,
)
from corral.protocol.worker import (
    PROTOCOL_VERSION,
    Call,
    CallArgs,
    CallResult,
    Cancel,
    ChatTemplateArgs,
    DetokenizeArgs,
    Failed,
    FromWorker,
    Heartbeat,
    Hello,
    InjectFault,
    Load,
    LoadFailed,
    Loaded,
    Shutdown,
    Step,
    Submit,
    TokenizeArgs,
    ToWorker,
    WorkerFaultKind,
)

__all__ = ["ProcessEngine", "ProcessEngineStatistics", "WorkerExitedError", "WorkerStandby",
           "worker_command"]

_log = structlog.get_logger("corral.process_engine")

_READ_SIZE: Final = 65536
SILENT_HEARTBEATS: Final = 5
"""A worker silent for this many heartbeat intervals is frozen: it is killed."""
_REAP_TIMEOUT_S: Final = 10.0

StartSoon = Callable[[Callable[[], Awaitable[object]]], object]
"""Runs `await fn()` in the background, e.g. `nursery.start_soon` or `Actor.start_soon`."""
ExitCause = Literal["exited", "signalled", "silent", "engine", "protocol", "callback"]


class WorkerExitedError(CorralError):
    """A worker process ended without being asked to; `on_failure` receives this.

    Attributes:
        pid: the worker's process id.
        returncode: its exit status; negative for a signal (-9 is SIGKILL, -11 SIGSEGV).
        cause: ``"exited"`` or ``"signalled"`` on its own; ``"engine"`` when its engine
            failed (`engine_error` says how); ``"silent"`` when it stopped sending
            heartbeats and was killed; ``"protocol"`` when it sent an undecodable frame
            and was killed; ``"callback"`` when `on_step` raised and it was killed.
    """

    code = Code.GENERATION_ERROR

    def __init__(self, pid: int, returncode: int | None, cause: ExitCause,
                 detail: str = "", engine_error: str | None = None) -> None:
        self.pid = pid
        self.returncode = returncode
        self.cause = cause
        self.engine_error = engine_error
        super().__init__(
            f"worker {pid} {_describe_exit(returncode)}" + (f": {detail}" if detail else ""),
            details={"pid": pid, "returncode": returncode, "cause": cause,
                     "engine_error": engine_error},
            retryable=True)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is gone"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ProcessEngineStatistics(EngineStatistics, frozen=True):
    """`EngineStatistics` of a worker process, as its steps and heartbeats tell them.

    `steps`, `generation_tokens` and `last_step_at` (when the last step frame arrived,
    by this process's `time.monotonic()`) follow every step frame; `active`, `queued`
    and `prompt_tokens` are as of the last heartbeat (`queued` adds the sequences sent
    since). A hung engine keeps heartbeating, so a stale `last_step_at` with work in
    hand is how an owner's watchdog sees it.

    Attributes:
        pid: the worker's process id, None before it started.
        hello_at: `time.monotonic()` when the worker's Hello arrived: it was ready for
            its model from then on.
        last_heartbeat_at: `time.monotonic()` when the last heartbeat arrived.
    """

    pid: int | None = None
    hello_at: float | None = None
    last_heartbeat_at: float | None = None


def worker_command(python_executable: str | None, heartbeat_interval_ms: int) -> list[str]:
    """The command line of a worker process serving this process."""
    return [python_executable or sys.executable, "-m", "corral.worker",
            "--heartbeat-ms", str(heartbeat_interval_ms), "--parent-pid", str(os.getpid())]


@final
class WorkerStandby:
    """One worker process per model started ahead of need: interpreter up, mlx_lm
    imported, Hello sent, no model loaded. An engine that starts after a crash adopts
    it (`take`) instead of starting a process, which is most of a restart's time, and
    asks for the next one (`replenish`) once its model is loaded.

    A standby that died while it waited is reaped and not handed out. `aclose` kills
    and reaps the one waiting and starts no more; it runs when the model is unloaded
    and when the runtime closes. Spares are started by system tasks, so no actor's
    restart cancels one half-started. Trio thread only.
    """

    def __init__(self, command: list[str]) -> None:
        self._command = command
        self._spare: trio.Process | None = None
        self._starting = False
        self._closed = False

    def take(self) -> trio.Process | None:
        """The waiting worker, now the caller's to run and reap; None if there is none."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is not None:
            _log.warning("process_engine.standby_died", pid=spare.pid,
                         returncode=spare.returncode)
            return None
        return spare

    def replenish(self) -> None:
        """Start the next standby in the background, unless one waits or is starting."""
        if not (self._closed or self._starting or self._spare is not None):
            self._starting = True
            trio.lowlevel.spawn_system_task(self._start)

    async def aclose(self) -> None:
        """Kill the waiting standby and wait until it is reaped; start no more."""
        self._closed = True
        spare, self._spare = self._spare, None
        if spare is not None:
            _kill(spare)
            with trio.CancelScope(shield=True):
                await _wait_reaped(spare)
                for stream in (spare.stdin, spare.stdout):
                    if stream is not None:
                        await stream.aclose()

    async def _start(self) -> None:
        try:
            process = await trio.lowlevel.open_process(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as exc:
            _log.warning("process_engine.standby_failed", error=repr(exc))
            return
        finally:
            self._starting = False
        if self._closed:
            _kill(process)
            with trio.CancelScope(shield=True):
                await _wait_reaped(process)
            return
        self._spare = process


@dataclass(eq=False)
class _Reply:
    event: trio.Event = field(default_factory=trio.Event)
    result: CallResult | None = None
    error: CorralError | None = None


@final
class ProcessEngine:
    """One model's engine in a worker process, with the interface of `Engine`.

    The worker's frames are read by a background task that `start` runs with
    `start_soon` (the owner's nursery), so callbacks run in the owner's trio thread:
    `on_step` with every step in order, `on_failure` at most once, when the worker ends
    unasked after it reported the model loaded (a failure before that is `start`'s
    error). Neither runs after `close` or `close_nowait`.

    If the owner's nursery is cancelled, the background task kills the worker and waits
    for it: a worker never outlives the task that reads it.

    Args:
        path: a local model directory for ``mlx_lm.load``, in the worker.
        prefill_batch_size, completion_batch_size, prefill_step_size, prefix_cache: as
            for `Engine`; the prefix cache lives in the worker.
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
        standby: where a worker started ahead of need waits; the engine adopts it if
            one does, and has the next one started once its model is loaded.
    """

    def __init__(
        self,
        path: str,
        *,
        prefill_batch_size: int = 8,
        completion_batch_size: int = 32,
        prefill_step_size: int = 2048,
        prefix_cache: PrefixCacheConfig = PrefixCacheConfig(),
        on_step: Callable[[EngineStep], None],
        on_failure: Callable[[BaseException], None],
        start_soon: StartSoon,
        heartbeat_interval_ms: int = 1000,
        startup_timeout_ms: int = 60000,
        shutdown_timeout_ms: int = 5000,
        python_executable: str | None = None,
        standby: WorkerStandby | None = None,
    ) -> None:
        self.path = str(path)
        self._load = Load(self.path, prefill_batch_size, completion_batch_size,
                          prefill_step_size, prefix_cache)
        self._on_step = on_step
        self._on_failure = on_failure
        self._start_soon = start_soon
        self._silence_limit_s = SILENT_HEARTBEATS * heartbeat_interval_ms / 1000.0
        self._startup_timeout_s = startup_timeout_ms / 1000.0
        self._shutdown_timeout_s = shutdown_timeout_ms / 1000.0
        self._command = worker_command(python_executable, heartbeat_interval_ms)
        self._standby = standby

        self._process: trio.Process | None = None
        self._outbox, self._outgoing = trio.open_memory_channel[bytes](math.inf)
        self._hello = trio.Event()
        self._load_answered = trio.Event()  # Loaded, LoadFailed, or the worker ended
        self._load_answer: Loaded | LoadFailed | None = None
        self._reaped = trio.Event()
        self._reading = False
        self._info: ModelInfo | None = None
        self._stopped = False  # no more commands: closing, or the worker is gone
        self._close_requested = False
        self._failure_reported = False
        self._kill_cause: tuple[ExitCause, str] | None = None
        self._engine_error: str | None = None
        self._calls: dict[int, _Reply] = {}
        self._call_ids = itertools.count(1)

        self._steps = 0
        self._generation_tokens = 0
        self._submits = 0
        self._last_step_at: float | None = None
        self._hello_at: float | None = None
        self._last_frame_at = 0.0  # trio time
        self._heartbeat: Heartbeat | None = None
        self._last_heartbeat_at: float | None = None

    @property
    def pid(self) -> int | None:
        """The worker's process id, or None before `start`."""
        return None if self._process is None else self._process.pid

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
        if self._process is not None:
            raise RuntimeError("a ProcessEngine starts once")
        problem: str | None = None
        try:
            with trio.move_on_after(self._startup_timeout_s) as startup:
                self._process = self._standby.take() if self._standby is not None else None
                if self._process is None:
                    self._process = await trio.lowlevel.open_process(
                        self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                self._start_soon(self._run)
                await self._hello.wait()
                if self._process.returncode is None and not self._stopped:
                    self._send(self._load)
                await self._load_answered.wait()
            if startup.cancelled_caught:
                problem = f"the worker did not load it within {self._startup_timeout_s:g} s"
        except BaseException:
            await self._abandon()
            raise
        answer = self._load_answer
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
            problem = self._describe_startup_end()
        raise EngineClientError(Code.MODEL_LOAD_ERROR, f"cannot load {self.path}: {problem}",
                                {"path": self.path, "pid": self.pid})

    def _describe_startup_end(self) -> str:
        if self._kill_cause is not None:
            return self._kill_cause[1]
        assert self._process is not None
        return f"the worker {_describe_exit(self._process.returncode)} while starting"

    async def close(self) -> None:
        """Stop the worker and wait until it has exited and is reaped. Idempotent.

        The worker is sent Shutdown (its engine finishes the current step and drops the
        batch) and the end of stdin; if it has not exited after `shutdown_timeout_ms`
        it is killed. No callback runs after this returns, and calls still waiting fail
        with ModelNotLoaded. On cancellation the worker is killed, and still reaped.
        """
        self._request_stop()
        process = self._process
        if process is None:
            return
        self._send(Shutdown())
        self._outbox.close()  # the writer sends what is queued, then closes stdin
        try:
            with trio.move_on_after(self._shutdown_timeout_s):
                await process.wait()
        finally:
            await self._abandon()

    def close_nowait(self) -> None:
        """Kill the worker now and close the pipes; do not wait. Idempotent.

        For owners that cannot wait (a crashed or cancelled actor's cleanup). The
        reader task reaps the worker; if it has ended already, a system task does.
        """
        self._request_stop()
        process = self._process
        if process is None:
            return
        _kill(process)
        for stream in (process.stdin, process.stdout):
            if isinstance(stream, trio.lowlevel.FdStream):
                stream.close()
        if not self._reading and not self._reaped.is_set():
            trio.lowlevel.spawn_system_task(_reap, process, self._reaped)

    def _request_stop(self) -> None:
        self._close_requested = True
        self._stop()

    def _stop(self) -> None:
        """Refuse further commands and fail the calls waiting for an answer."""
        if self._stopped:
            return
        self._stopped = True
        error = EngineClientError(Code.MODEL_NOT_LOADED,
                                  f"the engine of {self.path} stopped", {"path": self.path})
        for reply in self._calls.values():
            reply.error = error
            reply.event.set()
        self._calls.clear()

    async def _abandon(self) -> None:
        """Kill the worker if it runs, and wait until it is reaped, even if cancelled."""
        self._stop()
        process = self._process
        if process is None:
            return
        _kill(process)
        with trio.CancelScope(shield=True):
            await _wait_reaped(process)

    # -- commands ------------------------------------------------------------------

    def submit(self, seq: EngineSequence) -> None:
        """Queue a sequence; it joins the batch at one of the worker's next steps.

        As `Engine.submit`: validated here, never blocks.

        Raises:
            EngineClientError: InvalidParams if the sequence cannot run; ModelNotLoaded
                if the engine is not serving.
        """
        info = self._require_running()
        validate_sequence(seq, info.vocab_size)
        self._submits += 1
        self._send(Submit(seq))

    def cancel(self, seq_id: int) -> None:
        """Remove a sequence from the batch at the worker's next step; never blocks.

        The sequence emits nothing more. Unknown ids, or a stopped engine, do nothing.
        """
        if not self._stopped and self._info is not None:
            self._send(Cancel(seq_id))

    def inject_fault(self, kind: WorkerFaultKind) -> None:
        """Test hook: ``"raise"`` and ``"hang"`` as in `Engine.inject_fault`; ``"exit"``
        makes the worker call ``os._exit(3)``; ``"segfault"`` makes it read address 0.
        """
        self._require_running()
        self._send(InjectFault(kind))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Encode text with the model's tokenizer, in the worker.

        Raises:
            EngineClientError: TokenizerError if the tokenizer refuses the input;
                ModelNotLoaded if the worker stops first.
        """
        value = await self._call(TokenizeArgs(text, add_special_tokens))
        assert isinstance(value, list)
        return value

    async def detokenize(self, ids: list[int]) -> str:
        """Decode token ids with the model's tokenizer, in the worker.

        Raises:
            EngineClientError: TokenizerError if an id is not in the vocabulary.
        """
        value = await self._call(DetokenizeArgs(list(ids)))
        assert isinstance(value, str)
        return value

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render chat messages with the model's template and encode them, in the worker.

        Raises:
            EngineClientError: TokenizerError if there is no template or it refuses
                the messages.
        """
        value = await self._call(ChatTemplateArgs(messages, add_generation_prompt))
        assert isinstance(value, list)
        return value

    def statistics(self) -> ProcessEngineStatistics:
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
            pid=self.pid,
            hello_at=self._hello_at,
            last_heartbeat_at=self._last_heartbeat_at,
        )

    def _require_running(self) -> ModelInfo:
        if self._info is None or self._stopped:
            raise EngineClientError(
                Code.MODEL_NOT_LOADED, f"the engine of {self.path} is not running",
                {"path": self.path})
        return self._info

    def _send(self, message: ToWorker) -> None:
        try:
            self._outbox.send_nowait(frame(encode(message)))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # closing, or the writer has ended with the worker: nobody to tell

    async def _call(self, args: CallArgs) -> list[int] | str:
        """Run a tokenizer call in the worker and return its value.

        On cancellation the call still runs in the worker; its answer is dropped.
        """
        self._require_running()
        call_id = next(self._call_ids)
        reply = self._calls[call_id] = _Reply()
        self._send(Call(call_id, args))
        try:
            await reply.event.wait()
        finally:
            self._calls.pop(call_id, None)
        if reply.error is not None:
            raise reply.error
        assert reply.result is not None
        if reply.result.error is not None:
            raise error_from_info(reply.result.error)
        assert reply.result.value is not None
        return reply.result.value

    # -- the background task: frames in, frames out, and the reaping ---------------

    async def _run(self) -> None:
        process = self._process
        assert process is not None and process.stdin is not None
        assert isinstance(process.stdout, trio.lowlevel.FdStream)
        self._reading = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_frames, process.stdin)
                nursery.start_soon(self._watch_silence)
                await self._read_frames(process.stdout)
                nursery.cancel_scope.cancel()
            # The end of stdout: the worker is exiting. Let it, for its true status.
            with trio.move_on_after(self._shutdown_timeout_s):
                await process.wait()
        finally:
            self._reading = False
            self._stop()
            _kill(process)
            with trio.CancelScope(shield=True):
                await _wait_reaped(process)
                for stream in (process.stdin, process.stdout):
                    await stream.aclose()
            self._reaped.set()
            self._load_answered.set()
            self._hello.set()
        self._report_exit(process)

    async def _write_frames(self, stdin: trio.abc.SendStream) -> None:
        async with self._outgoing:
            async for payload in self._outgoing:
                batch = [payload]
                while True:
                    try:
                        batch.append(self._outgoing.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await stdin.send_all(b"".join(batch))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the worker is gone; the reader reports it
        # Closed by `close`: everything is sent, so the worker may see the end of stdin.
        await stdin.aclose()

    async def _read_frames(self, stdout: trio.lowlevel.FdStream) -> None:
        """Dispatch frames until the end of stdout, or kill the worker for a reason."""
        reader = FrameReader()
        decode = Decoder(FromWorker).decode
        fd = stdout.fileno()
        while True:
            # Each step is a frame and comes alone, so wait before reading: a read
            # first (as `receive_some` does) would find the pipe empty almost always.
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return  # close_nowait closed it
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            if not data:
                return
            self._last_frame_at = trio.current_time()
            try:
                for payload in reader.feed(data):
                    self._dispatch(decode(payload))
            except (FrameError, DecodeError) as exc:
                self._kill_for("protocol", f"undecodable frame: {exc}")
                return
            except Exception as exc:  # from on_step: the owner cannot take more steps
                self._kill_for("callback", f"on_step raised {exc!r}")
                return

    async def _watch_silence(self) -> None:
        """Kill a loaded worker that sends nothing, not even a heartbeat, for too long.

        Until the model is loaded, `start` applies the startup timeout instead.
        """
        await self._load_answered.wait()
        while True:
            deadline = self._last_frame_at + self._silence_limit_s
            if trio.current_time() >= deadline:
                self._kill_for("silent", f"no heartbeat for {self._silence_limit_s:g} s")
                return
            await trio.sleep_until(deadline)

    def _dispatch(self, message: FromWorker) -> None:
        match message:
            case Step(step=step):
                self._deliver(step)
            case Heartbeat():
                self._beat(message)
            case CallResult(call_id=call_id):
                reply = self._calls.pop(call_id, None)
                if reply is not None:
                    reply.result = message
                    reply.event.set()
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

    def _beat(self, beat: Heartbeat) -> None:
        # Its `last_step_age_s` adds nothing here: every step frame precedes it in the
        # pipe, and `_deliver` timed their arrival.
        self._heartbeat = beat
        self._last_heartbeat_at = time.monotonic()

    def _kill_for(self, cause: ExitCause, detail: str) -> None:
        assert self._process is not None
        if self._kill_cause is None:
            self._kill_cause = (cause, detail)
        _log.error("process_engine.killing_worker", path=self.path, pid=self._process.pid,
                   cause=cause, detail=detail)
        _kill(self._process)

    def _report_exit(self, process: trio.Process) -> None:
        """Call `on_failure` once if the worker ended unasked after a successful start."""
        if self._close_requested or self._info is None or self._failure_reported:
            return
        self._failure_reported = True
        returncode = process.returncode
        if self._kill_cause is not None:
            cause, detail = self._kill_cause
        elif self._engine_error is not None:
            cause, detail = "engine", f"engine failed: {self._engine_error}"
        else:
            cause = "signalled" if returncode is not None and returncode < 0 else "exited"
            detail = ""
        error = WorkerExitedError(process.pid, returncode, cause, detail, self._engine_error)
        _log.error("process_engine.worker_exited", path=self.path, pid=process.pid,
                   returncode=returncode, cause=cause, detail=detail)
        self._on_failure(error)


def _kill(process: trio.Process) -> None:
    """SIGKILL the process unless it is reaped already (then its pid may be reused)."""
    if process.returncode is None:
        try:
            process.kill()
        except ProcessLookupError:
            pass


async def _wait_reaped(process: trio.Process) -> None:
    """Wait for a killed process; past `_REAP_TIMEOUT_S` leave it to a system task.

    A killed process exits at once unless it is stuck in the kernel (uninterruptible
    I/O); the owner must not hang on that, yet the process must still be waited for.
    """
    with trio.move_on_after(_REAP_TIMEOUT_S):
        await process.wait()
        return
    _log.error("process_engine.reap_delayed", pid=process.pid)
    trio.lowlevel.spawn_system_task(_reap, process, None)


async def _reap(process: trio.Process, reaped: trio.Event | None) -> None:
    """A system task: wait for a process no task waits for, until the run ends."""
    try:
        await process.wait()
    except (trio.Cancelled, OSError):
        return
    if reaped is not None:
        reaped.set()
