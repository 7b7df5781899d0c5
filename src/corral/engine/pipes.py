"""The pipes to one worker process: frames out on its stdin, frames in from its stdout.

`WorkerPipes` batches queued frames into one write, reads and decodes what comes back
for a dispatcher, kills a worker that falls silent or speaks nonsense (and remembers
why), and reaps it once its stdout ends. What the frames mean is
`corral.engine.process`'s business.

Trio thread only. It must never leave the worker unreaped, never block on a send
(frames queue without bound; the worker reads them as fast as it can), and never let a
dispatcher's exception escape: it kills the worker instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Final, final

import structlog
import trio

from corral.engine.spawn import (
    ExitCause,
    WorkerExitedError,
    describe_exit,
    kill,
    kill_and_reap,
    reap_in_background,
)
from corral.protocol.codec import DecodeError, Decoder, FrameError, FrameReader, encode, frame
from corral.protocol.worker import FromWorker, ToWorker

__all__ = ["WorkerPipes"]

_log = structlog.get_logger("corral.process_engine")

_READ_SIZE: Final = 65536


@final
class WorkerPipes:
    """Frames to and from one worker process, and the worker's end.

    Args:
        process: the worker, started with piped stdin and stdout.
        path: the worker's model, for logs.
        silence_limit_s: once `watch_from` is set, a worker that sends nothing for this
            long is killed (cause ``"silent"``).
        shutdown_timeout_s: how long a worker whose stdout ended may take to exit
            before it is killed.
    """

    def __init__(self, process: trio.Process, *, path: str, silence_limit_s: float,
                 shutdown_timeout_s: float) -> None:
        self.process = process
        self.kill_cause: tuple[ExitCause, str] | None = None
        """Why this side killed the worker, with a detail; None if it did not."""
        self.reaped = trio.Event()
        self._path = path
        self._silence_limit_s = silence_limit_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._outbox, self._outgoing = trio.open_memory_channel[bytes](math.inf)
        self._reading = False
        self._last_frame_at = 0.0  # trio time

    def send(self, message: ToWorker) -> None:
        """Queue a frame; never blocks. Dropped once sending has ended or the worker
        is gone: there is nobody to tell."""
        try:
            self._outbox.send_nowait(frame(encode(message)))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def finish_sending(self) -> None:
        """Send what is queued, then close the worker's stdin."""
        self._outbox.close()

    async def serve(self, dispatch: Callable[[FromWorker], None],
                    watch_from: trio.Event) -> None:
        """Write frames and dispatch the frames read until the worker's stdout ends (or
        it is killed for a reason), then let it exit, for its true status, within the
        shutdown timeout. On cancellation it stops at once. Either way the caller must
        `reap` afterwards.

        Args:
            dispatch: called with every frame, in order. If it raises `FrameError`, the
                worker is killed for ``"protocol"``; any other exception kills it for
                ``"callback"``.
            watch_from: silence is watched for from when this is set.
        """
        process = self.process
        assert process.stdin is not None
        assert isinstance(process.stdout, trio.lowlevel.FdStream)
        self._reading = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_frames, process.stdin)
            nursery.start_soon(self._watch_silence, watch_from)
            await self._read_frames(process.stdout, dispatch)
            nursery.cancel_scope.cancel()
        with trio.move_on_after(self._shutdown_timeout_s):
            await process.wait()

    async def reap(self) -> None:
        """Kill the worker unless it has exited, wait until it is reaped and close the
        pipes. Shielded from cancellation."""
        self._reading = False
        await kill_and_reap(self.process, close_pipes=True)
        self.reaped.set()

    async def abandon(self) -> None:
        """Kill the worker and wait until it is reaped; shielded from cancellation."""
        await kill_and_reap(self.process)

    def close_nowait(self) -> None:
        """Kill the worker and close the pipes now. `serve`'s caller reaps it; if none
        runs, a system task does."""
        process = self.process
        kill(process)
        for stream in (process.stdin, process.stdout):
            if isinstance(stream, trio.lowlevel.FdStream):
                stream.close()
        if not self._reading and not self.reaped.is_set():
            reap_in_background(process, self.reaped)

    def describe_start_end(self, memory_note: str) -> str:
        """Why the worker ended before its model loaded; `memory_note` is added when
        only its exit status tells (its memory limit may explain that)."""
        if self.kill_cause is not None:
            return self.kill_cause[1]
        return f"the worker {describe_exit(self.process.returncode)} while starting{memory_note}"

    def exit_error(self, engine_error: str | None) -> WorkerExitedError:
        """How the worker ended, for its owner: the reason this side killed it, else its
        engine's failure (`engine_error`, from its `Failed` frame), else its status."""
        returncode = self.process.returncode
        cause: ExitCause
        if self.kill_cause is not None:
            cause, detail = self.kill_cause
        elif engine_error is not None:
            cause, detail = "engine", f"engine failed: {engine_error}"
        else:
            cause = "signalled" if returncode is not None and returncode < 0 else "exited"
            detail = ""
        return WorkerExitedError(self.process.pid, returncode, cause, detail, engine_error)

    def kill_for(self, cause: ExitCause, detail: str) -> None:
        """Kill the worker, remembering the first reason given."""
        if self.kill_cause is None:
            self.kill_cause = (cause, detail)
        _log.error("process_engine.killing_worker", path=self._path, pid=self.process.pid,
                   cause=cause, detail=detail)
        kill(self.process)

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
        # Closed by `finish_sending`: everything is sent, so the worker may see the end
        # of stdin.
        await stdin.aclose()

    async def _read_frames(self, stdout: trio.lowlevel.FdStream,
                           dispatch: Callable[[FromWorker], None]) -> None:
        """Dispatch frames until the end of stdout, or kill the worker for a reason."""
        reader = FrameReader()
        decode = Decoder[FromWorker](FromWorker).decode
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
                    dispatch(decode(payload))
            except (FrameError, DecodeError) as exc:
                self.kill_for("protocol", f"undecodable frame: {exc}")
                return
            except Exception as exc:  # from on_step: the owner cannot take more steps
                self.kill_for("callback", f"on_step raised {exc!r}")
                return

    async def _watch_silence(self, watch_from: trio.Event) -> None:
        """Kill a worker that sends nothing, not even a heartbeat, for too long."""
        await watch_from.wait()
        while True:
            deadline = self._last_frame_at + self._silence_limit_s
            if trio.current_time() >= deadline:
                self.kill_for("silent", f"no heartbeat for {self._silence_limit_s:g} s")
                return
            await trio.sleep_until(deadline)
