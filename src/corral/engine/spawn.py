"""Worker processes as processes: their command line, standbys, killing and reaping, and
how an unasked exit is told to the owner (`WorkerExitedError`).

`corral.engine.process` speaks to a worker; this module only starts, kills and waits for
one. It must never leave a process unreaped: a process it kills is waited for, or handed
to a system task that waits for it until the run ends. Trio thread only.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal, final

import msgspec
import structlog
import trio

from corral.engine.blas import CpuBlas, worker_environment
from corral.protocol.errors import Code, CorralError
from corral.protocol.gang import LOOPBACK

__all__ = ["ExitCause", "StartSoon", "WorkerCommand", "WorkerExitedError", "WorkerStandby",
           "describe_exit", "kill", "kill_and_reap", "memory_limit_note",
           "reap_in_background", "worker_command"]

_log = structlog.get_logger("corral.process_engine")

_REAP_TIMEOUT_S: Final = 10.0
# A worker may map 3/4 of physical memory by default: a model that fits is far below
# it, and a bad one fails alone (ModelLoadError) before the machine swaps or kills.
_WORKER_MEMORY_SHARE: Final = 75  # percent
_UNKNOWN_MEMORY_MB: Final = 1 << 20  # 1 TiB when the OS will not say: in effect no limit

StartSoon = Callable[[Callable[[], Awaitable[object]]], object]
"""Runs `await fn()` in the background, e.g. `nursery.start_soon` or `Actor.start_soon`."""

ExitCause = Literal["exited", "signalled", "silent", "engine", "protocol", "callback",
                    "gang"]


class WorkerExitedError(CorralError):
    """A worker process ended without being asked to; `on_failure` receives this.

    Attributes:
        pid: the worker's process id.
        returncode: its exit status; negative for a signal (-9 is SIGKILL, -11 SIGSEGV).
        cause: ``"exited"`` or ``"signalled"`` on its own; ``"engine"`` when its engine
            failed (`engine_error` says how); ``"silent"`` when it stopped sending
            heartbeats and was killed; ``"protocol"`` when it sent an undecodable frame
            and was killed; ``"callback"`` when `on_step` raised and it was killed;
            ``"gang"`` when another rank of its gang died or fell silent, and every rank
            was killed.
    """

    code = Code.GENERATION_ERROR

    def __init__(self, pid: int, returncode: int | None, cause: ExitCause,
                 detail: str = "", engine_error: str | None = None) -> None:
        self.pid = pid
        self.returncode = returncode
        self.cause = cause
        self.engine_error = engine_error
        super().__init__(
            f"worker {pid} {describe_exit(returncode)}" + (f": {detail}" if detail else ""),
            details={"pid": pid, "returncode": returncode, "cause": cause,
                     "engine_error": engine_error},
            retryable=True)


def describe_exit(returncode: int | None) -> str:
    """How a process ended, from its return code, as a predicate: "exited with ..."."""
    if returncode is None:
        return "is gone"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class WorkerCommand(msgspec.Struct, frozen=True):
    """How a worker process starts: its command line and the BLAS it loads.

    Attributes:
        argv: the command line.
        cpu_blas: the ``generation.cpu_blas`` setting (see `corral.engine.blas`).
        memory_limit_mb: the address space the worker may map (Linux only).
    """

    argv: tuple[str, ...]
    cpu_blas: CpuBlas = "auto"
    memory_limit_mb: int | None = None

    def for_rank(self, rank: int, addresses: Sequence[str], host: str) -> WorkerCommand:
        """The command of a gang's rank `rank` on `host`, its ring at `addresses` (one
        HOST:PORT per rank). A rank on another host starts there with ``ssh HOST``:
        its parent is then the ssh session, whose end ends it."""
        argv = (*self.argv, "--gang-rank", str(rank), "--gang-addresses", ",".join(addresses))
        if host != LOOPBACK:
            at = argv.index("--parent-pid")
            argv = ("ssh", host, shlex.join(argv[:at] + argv[at + 2:]))
        return msgspec.structs.replace(self, argv=argv)

    def memory_note(self) -> str:
        """What to add to a worker's death while loading, which its memory limit may
        explain; "" where no limit holds."""
        if self.memory_limit_mb is None or sys.platform != "linux":
            return ""
        return memory_limit_note(self.memory_limit_mb)

    async def open(self) -> trio.Process:
        """Start a worker process with pipes on its stdin and stdout, in the environment
        its BLAS choice asks for (`corral.engine.blas.worker_environment`, run in a
        thread: the first call may compile the BLAS shim).

        Raises:
            OSError: the process cannot be started.

        Not cancellable (as `trio.lowlevel.open_process`): the process it returns is
        the caller's to reap.
        """
        env = await trio.to_thread.run_sync(worker_environment, self.cpu_blas)
        return await trio.lowlevel.open_process(list(self.argv), stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, env=env)


def memory_limit_note(limit_mb: int) -> str:
    """The words added to a load failure the worker's memory limit explains."""
    return f" (the worker may map at most {limit_mb} MiB: python_runtime.worker_memory_limit_mb)"


def worker_command(python_executable: str | None, heartbeat_interval_ms: int,
                   cpu_blas: CpuBlas = "auto",
                   memory_limit_mb: int | None = None) -> WorkerCommand:
    """How to start a worker process serving this process, its address space limited
    to `memory_limit_mb` (`_WORKER_MEMORY_SHARE` of physical memory when None)."""
    if memory_limit_mb is None:
        memory_limit_mb = _physical_memory_mb() * _WORKER_MEMORY_SHARE // 100
    return WorkerCommand(
        (python_executable or sys.executable, "-m", "corral.engine.worker",
         "--heartbeat-ms", str(heartbeat_interval_ms), "--parent-pid", str(os.getpid()),
         "--memory-limit-mb", str(memory_limit_mb)),
        cpu_blas, memory_limit_mb)


def _physical_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError, AttributeError):
        return _UNKNOWN_MEMORY_MB


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

    Args:
        command: how to start the worker (see `worker_command`).
    """

    def __init__(self, command: WorkerCommand) -> None:
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
        """Kill the waiting standby and wait until it is reaped; start no more.

        Shielded from cancellation: the standby is reaped either way.
        """
        self._closed = True
        spare, self._spare = self._spare, None
        if spare is not None:
            await kill_and_reap(spare, close_pipes=True)

    async def _start(self) -> None:
        try:
            process = await self._command.open()
        except OSError as exc:
            _log.warning("process_engine.standby_failed", error=repr(exc))
            return
        finally:
            self._starting = False
        if self._closed:
            await kill_and_reap(process)
            return
        self._spare = process


def kill(process: trio.Process) -> None:
    """SIGKILL the process unless it is reaped already (then its pid may be reused)."""
    if process.returncode is None:
        try:
            process.kill()
        except ProcessLookupError:
            pass


async def kill_and_reap(process: trio.Process, *, close_pipes: bool = False) -> None:
    """Kill the process unless it has exited and wait until it is reaped, then close
    its pipes if asked. Shielded from cancellation."""
    kill(process)
    with trio.CancelScope(shield=True):
        await _wait_reaped(process)
        if close_pipes:
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()


async def _wait_reaped(process: trio.Process) -> None:
    """Wait for a killed process; past `_REAP_TIMEOUT_S` leave it to a system task.

    A killed process exits at once unless it is stuck in the kernel (uninterruptible
    I/O); the owner must not hang on that, yet the process must still be waited for.
    `kill_and_reap` calls it shielded from cancellation.
    """
    with trio.move_on_after(_REAP_TIMEOUT_S):
        await process.wait()
        return
    _log.error("process_engine.reap_delayed", pid=process.pid)
    reap_in_background(process)


def reap_in_background(process: trio.Process, reaped: trio.Event | None = None) -> None:
    """Have a system task wait for `process` until the run ends, then set `reaped`."""
    trio.lowlevel.spawn_system_task(_reap, process, reaped)


async def _reap(process: trio.Process, reaped: trio.Event | None) -> None:
    try:
        await process.wait()
    except (trio.Cancelled, OSError):
        return
    if reaped is not None:
        reaped.set()
