"""The other ranks of a gang (one model across processes with mlx.distributed), seen
from the `ProcessEngine` that runs its rank 0.

Rank 0 is an ordinary worker that speaks for the gang. Ranks 1 and up are worker
processes too; `GangRanks` starts them, sends them the same `Load`, and watches them:
a rank whose pipe closes, that falls silent, or whose engine fails is a lost gang, and
`on_lost` is called once, so the owner kills every rank at once (a rank left alive
would wait forever inside a collective). Trio thread only. It must never leave a rank
unreaped: each reader task reaps its rank, whatever ends it.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from contextlib import ExitStack
from typing import final

import structlog
import trio

from corral.engine.pipes import WorkerPipes
from corral.engine.spawn import StartSoon, WorkerCommand, describe_exit
from corral.protocol.codec import FrameError
from corral.protocol.errors import ErrorInfo
from corral.protocol.gang import LOOPBACK, DistributedSettings
from corral.protocol.worker import (
    PROTOCOL_VERSION,
    Failed,
    FromWorker,
    Hello,
    Load,
    Loaded,
    LoadFailed,
    Shutdown,
)

__all__ = ["GangRanks", "ring_addresses"]

_log = structlog.get_logger("corral.process_engine")


def ring_addresses(gang: DistributedSettings) -> list[str]:
    """Where each rank's ring listens, HOST:PORT, rank 0 first: `gang.port + rank`, or
    free ports of this host when `gang.port` is 0 (every rank on 127.0.0.1 then)."""
    hosts = gang.rank_hosts
    if gang.port:
        return [f"{host}:{gang.port + rank}" for rank, host in enumerate(hosts)]
    with ExitStack() as held:  # held together, so no two ranks get the same port
        ports = []
        for _ in hosts:
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
    return [f"{LOOPBACK}:{port}" for port in ports]


@final
class GangRanks:
    """Ranks 1 to N-1 of one gang: their processes, their load, their end.

    Args:
        command: the worker command, made per rank with `WorkerCommand.for_rank`.
        gang: the gang's settings; each start listens at new `ring_addresses`.
        path: the model, for logs.
        silence_limit_s: a loaded rank silent this long is lost.
        shutdown_timeout_s: how long a rank whose stdout ended may take to exit.
        on_lost: called once, in the trio thread, with what happened, when a rank ends
            or fails without `close` having been called.
    """

    def __init__(self, command: WorkerCommand, gang: DistributedSettings, *, path: str,
                 silence_limit_s: float, shutdown_timeout_s: float,
                 on_lost: Callable[[str], None]) -> None:
        self._command = command
        self._hosts = gang.rank_hosts
        self._addresses = ring_addresses(gang)
        self._path = path
        self._silence_limit_s = silence_limit_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._on_lost = on_lost
        self._pipes: list[WorkerPipes] = []
        self._loaded: list[trio.Event] = []
        self.load_error: ErrorInfo | None = None
        """The first `LoadFailed` a rank sent, if any."""
        self._closing = False
        self._lost = False

    @property
    def pids(self) -> list[int]:
        """The process ids of ranks 1 and up, in rank order."""
        return [pipes.process.pid for pipes in self._pipes]

    async def open_rank0(self) -> trio.Process:
        """Start rank 0, here (see `WorkerCommand.open`); its owner reads and reaps it.

        Raises:
            OSError: it cannot be started.
        """
        return await self._command.for_rank(0, self._addresses, LOOPBACK).open()

    async def start(self, load: Load, start_soon: StartSoon) -> None:
        """Start every rank, send it `load` and a reader task each (`start_soon`).

        Raises:
            OSError: a rank's process cannot be started; those started are killed, and
                their reader tasks reap them.

        Not cancellable between starting a process and handing it to its reader.
        """
        for rank in range(1, len(self._hosts)):
            command = self._command.for_rank(rank, self._addresses, self._hosts[rank])
            try:
                process = await command.open()
            except OSError:
                self.kill()
                raise
            pipes = WorkerPipes(process, path=self._path,
                                silence_limit_s=self._silence_limit_s,
                                shutdown_timeout_s=self._shutdown_timeout_s)
            loaded = trio.Event()
            self._pipes.append(pipes)
            self._loaded.append(loaded)
            pipes.send(load)
            start_soon(functools.partial(self._read, rank, pipes, loaded))

    async def wait_loaded(self) -> None:
        """Wait until every rank answered its load, or ended."""
        for loaded in self._loaded:
            await loaded.wait()

    def shutdown(self) -> None:
        """Ask every rank to stop (`Shutdown`, then the end of its stdin); no rank is
        lost by ending after this."""
        self._closing = True
        for pipes in self._pipes:
            pipes.send(Shutdown())
            pipes.finish_sending()

    async def wait_exited(self) -> None:
        """Wait until every rank has been reaped."""
        for pipes in self._pipes:
            await pipes.reaped.wait()

    def kill(self) -> None:
        """Kill every rank now; no rank is lost by ending after this. Their reader tasks
        reap them (a system task, for a rank whose reader never ran)."""
        self._closing = True
        for pipes in self._pipes:
            pipes.close_nowait()

    async def _read(self, rank: int, pipes: WorkerPipes, loaded: trio.Event) -> None:
        def dispatch(message: FromWorker) -> None:
            match message:
                case Hello(version=version) if version != PROTOCOL_VERSION:
                    raise FrameError(f"rank {rank} speaks protocol {version}, "
                                     f"not {PROTOCOL_VERSION}")
                case Loaded():
                    loaded.set()
                case LoadFailed(error=error):
                    self.load_error = self.load_error or error
                    loaded.set()
                case Failed(error=error):
                    _log.error("gang.rank_failed", path=self._path, rank=rank, error=error)

        try:
            await pipes.serve(dispatch, watch_from=loaded)
        finally:
            loaded.set()
            await pipes.reap()
        if self._closing or self._lost:
            return
        self._lost = True
        cause = pipes.kill_cause[1] if pipes.kill_cause is not None else ""
        detail = (f"rank {rank} (pid {pipes.process.pid}) "
                  f"{describe_exit(pipes.process.returncode)}" + (f": {cause}" if cause else ""))
        _log.error("gang.rank_lost", path=self._path, rank=rank, detail=detail)
        self._on_lost(detail)
