"""`python -m corral.engine.worker`: one model's engine in a process of its own.

A `ProcessEngine` starts this (see `corral.engine.process`) and speaks
`corral.protocol.worker` frames with it: commands on stdin, steps, answers and
heartbeats on stdout. The engine is the in-process `corral.engine.thread.Engine`,
unchanged; this module only carries its calls and callbacks over the pipes.

The worker must never outlive its parent: it exits at once on the end of stdin, when
its parent process is gone (a parent-death signal on Linux, `getppid()` checked at every
heartbeat everywhere), and when the pipe to its parent breaks. Its stdout carries frames
and nothing else: whatever else writes to file descriptor 1 lands on stderr.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn

import structlog
import trio

from corral.config import LoggingConfig
from corral.engine.mlx_import import import_mlx_lm
from corral.engine.spawn import memory_limit_note
from corral.engine.thread import Engine
from corral.logging import configure_logging
from corral.protocol.codec import DecodeError, Decoder, FrameError, FrameReader, encode, frame
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.messages import EngineStep
from corral.protocol.serving_messages import CancelSequence, InjectFault, Submit
from corral.protocol.worker import (
    PROTOCOL_VERSION,
    Call,
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

__all__ = ["main"]

_log = structlog.get_logger("corral.worker")

_READ_SIZE: Final = 65536
_PR_SET_PDEATHSIG: Final = 1
# Linux sends the parent-death signal when the *thread* that started us exits, and trio
# starts processes from a cached thread that exits after a few idle seconds. So the
# first signal is a catchable one whose handler checks whether the parent process is
# really gone (see `_die_with_parent`).
_PARENT_THREAD_EXITED: Final = signal.SIGUSR1

EXIT_SHUTDOWN: Final = 0
EXIT_ORPHANED: Final = 0
EXIT_ENGINE_FAILED: Final = 1
EXIT_PROTOCOL_ERROR: Final = 2
EXIT_INJECTED: Final = 3


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the worker until Shutdown, the end of stdin, or the parent's death."""
    args = _parse_args(argv)
    frames_fd = os.dup(1)
    os.dup2(2, 1)  # print(), C libraries and structlog's default all write to fd 1
    parent_pid = args.parent_pid if args.parent_pid is not None else os.getppid()
    _die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when its
    # worker stops, not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(LoggingConfig(format=args.log_format, level=args.log_level))
    structlog.contextvars.bind_contextvars(worker_pid=os.getpid())
    if args.memory_limit_mb is not None:
        _limit_address_space(args.memory_limit_mb)
    if args.gang_rank is not None:
        _join_gang(args.gang_rank, args.gang_addresses)
    # Paid before Hello: a standby worker (see `WorkerStandby`) has it behind it when a
    # restart adopts it, and it is most of a worker's start.
    import_mlx_lm()
    worker = _Worker(frames_fd, args.heartbeat_ms / 1000.0, parent_pid,
                     sends_steps=not args.gang_rank)
    code = trio.run(worker.run)
    sys.stderr.flush()
    # Every frame is written and the engine thread has stopped: nothing is left for
    # interpreter teardown to do, and skipping it keeps the exit status ours.
    os._exit(code)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m corral.engine.worker",
                                     description="corral's engine worker process")
    parser.add_argument("--heartbeat-ms", type=int, default=1000)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit if this process is not our parent (default: getppid())")
    parser.add_argument("--memory-limit-mb", type=int, default=None,
                        help="RLIMIT_AS of this process, in MiB (Linux; default: none)")
    parser.add_argument("--gang-rank", type=int, default=None,
                        help="this worker's rank in an mlx.distributed gang")
    parser.add_argument("--gang-addresses", default="",
                        help="the gang's ring addresses, HOST:PORT per rank, comma-separated")
    parser.add_argument("--log-format", choices=["console", "json"], default="console")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error", "critical"])
    args = parser.parse_args(argv)
    if args.heartbeat_ms <= 0:
        parser.error("--heartbeat-ms must be > 0")
    return args


def _join_gang(rank: int, addresses: str) -> None:
    """Tell mlx.distributed (read when the model loads) this worker's rank and where
    every rank listens: its ring backend reads both from the environment, the
    addresses from a JSON file, one list per rank."""
    hostfile = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as we do)
        "w", prefix="corral-gang-", suffix=".json", delete=False)
    with hostfile:
        json.dump([[address] for address in addresses.split(",")], hostfile)
    atexit.register(os.unlink, hostfile.name)
    os.environ["MLX_HOSTFILE"] = hostfile.name
    os.environ["MLX_RANK"] = str(rank)
    structlog.contextvars.bind_contextvars(rank=rank)


def _limit_address_space(limit_mb: int) -> None:
    """Cap the address space (RLIMIT_AS) at `limit_mb`, never above the hard limit, so
    an allocation past it fails (MemoryError, an MLX allocation error) and the load
    that made it fails with a ModelLoadError, instead of the machine running out of
    memory. Linux only: macOS does not enforce RLIMIT_AS, and Metal maps GPU memory
    into the address space."""
    if sys.platform != "linux":
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = limit_mb << 20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    _log.info("worker.memory_limited", limit_mb=limit >> 20)


def _memory_limit_explains(path: str, error: CorralError) -> str:
    """`memory_limit_note` when this worker's address-space limit explains a failed
    load: a MemoryError, or what it had mapped at its peak plus the model's weights
    come to the limit (MLX then fails a read or an allocation in its own words).
    "" otherwise, and where no limit holds."""
    if sys.platform != "linux":
        return ""
    import resource

    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return ""
    weights = sum(file.stat().st_size for file in Path(path).glob("*.safetensors"))
    if "MemoryError" in error.message or _peak_mapped_bytes() + weights >= limit:
        return memory_limit_note(limit >> 20)
    return ""


def _peak_mapped_bytes() -> int:
    """The most address space this process has mapped (VmPeak), 0 if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError):
        pass
    return 0


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent process dies, even if this process cannot run Python then.

    On Linux the parent-death signal is first a catchable one: it also fires when only
    the parent's spawning thread exits, and then the handler re-arms it as SIGKILL,
    bound now to a longer-lived thread of the parent (the kernel picks the main thread
    first). Elsewhere the end of stdin and the heartbeat's `getppid()` check do it.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)

        def set_parent_death_signal(signum: int) -> None:
            if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
                _log.warning("worker.pdeathsig_failed", errno=ctypes.get_errno())

        def on_parent_thread_exit(signum: int, frame: FrameType | None) -> None:
            if os.getppid() != parent_pid:
                os._exit(EXIT_ORPHANED)
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != parent_pid:  # it died while we re-armed
                os._exit(EXIT_ORPHANED)

        signal.signal(_PARENT_THREAD_EXITED, on_parent_thread_exit)
        set_parent_death_signal(_PARENT_THREAD_EXITED)
    # The parent may have died before the signal was armed.
    if os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)


class _Worker:
    """The worker's trio program: a frame reader, a frame writer and a heartbeat."""

    def __init__(self, frames_fd: int, heartbeat_s: float, parent_pid: int, *,
                 sends_steps: bool = True) -> None:
        self._heartbeat_s = heartbeat_s
        self._sends_steps = sends_steps  # a gang's rank 0 speaks for every rank
        self._parent_pid = parent_pid
        self._writer = _FrameWriter(frames_fd)
        self._finished = trio.Event()
        self._engine: Engine | None = None
        self._submits = 0
        self._exit_code: int | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self) -> int:
        """Serve until told to stop; return the exit status."""
        self._emit(Hello(os.getpid(), PROTOCOL_VERSION))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._read_frames)
            nursery.start_soon(self._beat)
            nursery.start_soon(self._writer.flush_pending)
            await self._finished.wait()
            nursery.cancel_scope.cancel()
        await self._writer.flush_pending(until_empty=True)
        assert self._exit_code is not None
        return self._exit_code

    def _emit(self, message: FromWorker) -> None:
        if self._exit_code is None:
            self._writer.write(frame(encode(message)))

    def _finish(self, code: int) -> None:
        """Send nothing more; `run` returns once what was sent is written."""
        if self._exit_code is None:
            self._exit_code = code
            self._finished.set()

    async def _read_frames(self) -> None:
        stream = trio.lowlevel.FdStream(os.dup(0))
        reader = FrameReader()
        decode = Decoder[ToWorker](ToWorker).decode
        while True:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                os._exit(EXIT_ORPHANED)  # the parent is gone or gave up on us: at once
            try:
                payloads = reader.feed(data)
            except FrameError as exc:
                self._protocol_error(str(exc))
                return
            for payload in payloads:
                try:
                    message = decode(payload)
                except DecodeError as exc:
                    self._protocol_error(str(exc))
                    return
                if type(message) is Shutdown:
                    await self._shutdown()
                    return
                self._apply(message)

    def _protocol_error(self, error: str) -> None:
        _log.error("worker.protocol_error", error=error)
        self._emit(Failed(f"undecodable frame from the parent: {error}"))
        self._finish(EXIT_PROTOCOL_ERROR)

    def _apply(self, message: ToWorker) -> None:
        assert self._nursery is not None
        match message:
            case Submit(seq=seq):
                self._submits += 1
                self._with_engine(lambda engine: engine.submit(seq))
            case CancelSequence(seq_id=seq_id):
                self._with_engine(lambda engine: engine.cancel(seq_id))
            case Call():
                self._nursery.start_soon(self._call, message)
            case Load():
                self._nursery.start_soon(self._load, message)
            case InjectFault():
                self._inject(message)

    def _with_engine(self, action: Callable[[Engine], None]) -> None:
        """Apply a command the parent checked already; a refusal now is only logged.

        The engine can stop between the parent's check and this (it failed, and the
        parent is about to hear so), so a refusal is not the parent's error.
        """
        if self._engine is None:
            _log.warning("worker.command_before_load")
            return
        try:
            action(self._engine)
        except CorralError as exc:
            _log.warning("worker.command_refused", error=repr(exc))

    async def _load(self, load: Load) -> None:
        if self._engine is not None:
            _log.warning("worker.second_load_ignored", path=load.settings.path)
            return
        self._engine = Engine(load.settings, on_step=self._on_step, on_failure=self._on_failure)
        try:
            info = await self._engine.start()
        except CorralError as exc:
            note = _memory_limit_explains(load.settings.path, exc)
            if note:
                exc = EngineClientError(exc.code, exc.message + note, exc.details)
            self._emit(LoadFailed(exc.info()))
            return
        self._emit(Loaded(info))

    def _on_step(self, step: EngineStep) -> None:
        if not self._sends_steps:
            return
        self._emit(Step(step))
        if self._engine is not None and any(out.finish_reason is not None
                                            for out in step.outputs):
            # A sequence ended: its counters (the prefix cache's, the tokens') reach the
            # parent now, not at the next beat, so a scrape after a request has ended
            # reads what that request did, and a second scrape reads the same.
            self._emit(self._heartbeat(self._engine))

    def _on_failure(self, error: BaseException) -> None:
        self._emit(Failed(repr(error)))
        self._finish(EXIT_ENGINE_FAILED)

    async def _call(self, call: Call) -> None:
        engine = self._engine
        try:
            if engine is None:
                raise EngineClientError(Code.MODEL_NOT_LOADED, "the worker has no model")
            args = call.args
            value: list[int] | str
            if isinstance(args, TokenizeArgs):
                value = await engine.tokenize(args.text, args.add_special_tokens)
            elif isinstance(args, DetokenizeArgs):
                value = await engine.detokenize(args.ids)
            else:
                assert isinstance(args, ChatTemplateArgs)
                value = await engine.apply_chat_template(
                    args.messages, args.add_generation_prompt, args.tools, args.kwargs)
        except CorralError as exc:
            self._emit(CallResult(call.call_id, error=exc.info()))
        else:
            self._emit(CallResult(call.call_id, value=value))

    def _inject(self, fault: InjectFault) -> None:
        kind = fault.kind
        if kind == "exit":
            os._exit(EXIT_INJECTED)
        elif kind == "segfault":
            sys.stderr.flush()
            ctypes.string_at(0)  # reads address 0: a real SIGSEGV
        else:
            self._with_engine(lambda engine: engine.inject_fault(kind))

    async def _shutdown(self) -> None:
        if self._engine is not None:
            await self._engine.close()
        self._finish(EXIT_SHUTDOWN)

    async def _beat(self) -> None:
        while True:
            await trio.sleep(self._heartbeat_s)
            if os.getppid() != self._parent_pid:
                os._exit(EXIT_ORPHANED)
            engine = self._engine
            if engine is not None:  # a standby's pipe is not read until it is adopted
                self._emit(self._heartbeat(engine))

    def _heartbeat(self, engine: Engine) -> Heartbeat:
        stats = engine.statistics()
        age = None if stats.last_step_at is None else time.monotonic() - stats.last_step_at
        return Heartbeat(stats.steps, stats.active, stats.queued, self._submits,
                         stats.prompt_tokens, stats.generation_tokens, age,
                         stats.prefix_cache, stats.step_expected_s)


class _FrameWriter:
    """Frames to the parent, written at once while the pipe has room.

    Each step is one frame, so this is the hot path: a frame goes out from the engine's
    callback with one `os.write`, without waking a writer task. Only what the pipe does
    not take is kept, in order, for `flush_pending`. A broken pipe means the parent is
    gone: the worker exits at once.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._pending = bytearray()
        self._has_pending = trio.Event()

    def write(self, data: bytes) -> None:
        if not self._pending:
            written = self._write(data)
            if written == len(data):
                return
            data = data[written:]
        self._pending += data
        self._has_pending.set()

    async def flush_pending(self, *, until_empty: bool = False) -> None:
        """Write what the pipe refused, as it makes room; forever, or until none is left."""
        while True:
            if not self._pending:
                if until_empty:
                    return
                await self._has_pending.wait()
                self._has_pending = trio.Event()
                continue
            await trio.lowlevel.wait_writable(self._fd)
            del self._pending[:self._write(self._pending)]

    def _write(self, data: bytes | bytearray) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE and the like: nobody reads us any more
            os._exit(EXIT_ORPHANED)

if __name__ == "__main__":
    main()
