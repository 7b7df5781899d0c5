"""Listening for stream connections: URI parsing, TCP and unix binds, stdio, the accept
loop, and the connection counters.

A `Listener` runs one handler per connection as a temporary child of its own dynamic
supervisor, so a crashed handler takes down its own connection only and is never
restarted. What a handler says on its connection is not this module's business: it
never reads or writes a connection's bytes (stdio aside, whose file descriptors it
arranges), and it knows nothing of JSON-RPC or of the runtime.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any, Final, Literal, Protocol, final
from urllib.parse import urlsplit

import msgspec
import structlog
import trio

from corral.actors.child_spec import ChildSpec, Restart, Strategy
from corral.actors.context import Child, Context
from corral.actors.ref import ActorRef
from corral.actors.supervisor import Supervisor
from corral.protocol.errors import CorralError

__all__ = ["HandlerFactory", "ListenAddress", "Listener", "ListenerStatistics", "parse_uri"]

# accept() errors that mean "overloaded for now" (as trio.serve_listeners treats them).
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                                            errno.ENOBUFS})
_ACCEPT_RETRY_S: Final = 0.1

_log = structlog.get_logger("corral.server.listen")


class ListenAddress(msgspec.Struct, frozen=True):
    """Where to listen, parsed from a URI by `parse_uri`.

    Attributes:
        kind: "tcp", "unix" or "stdio".
        host: the TCP host, or the unix socket's path; "" for stdio.
        port: the TCP port (0: any free port); 0 otherwise.
    """

    kind: Literal["tcp", "unix", "stdio"]
    host: str = ""
    port: int = 0


def parse_uri(uri: str) -> ListenAddress:
    """`tcp://HOST:PORT`, `unix://PATH` or `stdio` as a `ListenAddress`.

    Raises:
        ValueError: for anything else (no host, no port, a path after the port, ...).
    """
    if uri == "stdio":
        return ListenAddress("stdio")
    if uri.startswith("unix://") and len(uri) > len("unix://"):
        return ListenAddress("unix", uri[len("unix://"):])
    parts = urlsplit(uri)
    if parts.scheme == "tcp" and parts.hostname:
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is not None and not parts.path:
            return ListenAddress("tcp", parts.hostname, port)
    raise ValueError(f"expected tcp://HOST:PORT, unix://PATH or stdio, got {uri!r}")


class ListenerStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one listener.

    Attributes:
        uri: what it listens on.
        address: the bound address (host and port, or a socket path), None for stdio or
            before it is bound.
        accepted: connections accepted since the listener was made, over all restarts.
        open: connections open now.
    """

    uri: str
    address: str | None
    accepted: int
    open: int


class HandlerFactory(Protocol):
    """Makes the handler of one accepted connection: a child that serves `stream` until
    it returns, and owns it (closes it) from the moment it is made. `stdio` says the
    stream is standard input and output, which has exactly one client."""

    def __call__(self, stream: trio.abc.Stream, *, stdio: bool) -> Child: ...


@final
class Listener:
    """Listens on one URI and runs a supervised handler per connection.

    `run` is a `Child`: it binds (a fresh bind per incarnation: with port 0, a new
    port), reports started, accepts until a stop is requested, then stops its
    connections, each within `shutdown_ms`. For stdio it serves the one connection of
    fd 0 and the original fd 1, and points fd 1 at standard error meanwhile, so that a
    stray print cannot corrupt the connection; both must be pipes, sockets or a
    terminal, not regular files.

    Attributes:
        uri: what it listens on.
        where: `uri`, parsed.
        address: the bound address ((host, port), or a socket path) while bound, else
            None.
        accepted: connections accepted since the listener was made, over all restarts.
        open: connections whose handler runs now.
    """

    def __init__(self, uri: str, make_handler: HandlerFactory, *, shutdown_ms: int,
                 on_stdio_closed: Callable[[], None] | None = None) -> None:
        """Raises: ValueError for a URI that is not tcp://HOST:PORT, unix://PATH or stdio.

        Args:
            make_handler: makes each connection's handler.
            shutdown_ms: how long a connection's handler may take to stop.
            on_stdio_closed: called when the stdio connection's handler has returned.
        """
        self.where = parse_uri(uri)
        self.uri = uri
        self.address: tuple[str, int] | str | None = None
        self.accepted = 0
        self.open = 0
        self._make_handler = make_handler
        self._shutdown_ms = shutdown_ms
        self._on_stdio_closed = on_stdio_closed
        self._numbers = itertools.count(1)

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port 0), or None."""
        return self.address[1] if isinstance(self.address, tuple) else None

    def statistics(self) -> ListenerStatistics:
        """A snapshot of the counters and the bound address."""
        address = self.address
        shown = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else address
        return ListenerStatistics(self.uri, shown, self.accepted, self.open)

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started, serve until a stop is requested.

        On a graceful stop it stops accepting, then stops its connections, each within
        its shutdown timeout. Cancelled (killed), every connection closes at once. A
        unix socket file it bound is removed when it returns, however it returns.

        Raises:
            OSError: the address cannot be bound (a start failure for the supervisor).
        """
        connections = Supervisor(strategy=Strategy.DYNAMIC)
        connections_ctx = Context(f"{ctx.path}/connections", ctx.system)
        serving = trio.CancelScope()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(connections.run, connections_ctx)
                if self.where.kind == "stdio":
                    await nursery.start(self._serve_stdio, connections, serving)
                else:
                    listeners = await self._bind()
                    nursery.start_soon(self._accept, listeners, connections, serving)
                task_status.started()
                await ctx.wait_stop_requested()
                serving.cancel()
                connections_ctx.request_stop()
        finally:
            connections_ctx.mailbox.stop()
            if self.where.kind == "unix" and self.address is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.where.host)  # ours: only a bound listener sets `address`
            self.address = None

    async def _bind(self) -> list[trio.SocketListener]:
        if self.where.kind == "tcp":
            listeners = await trio.open_tcp_listeners(self.where.port, host=self.where.host)
            host, port = listeners[0].socket.getsockname()[:2]
            self.address = (host, port)
            return listeners
        path = self.where.host
        await _remove_stale_socket(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen()
        except BaseException:
            sock.close()
            raise
        self.address = path
        return [trio.SocketListener(sock)]

    async def _accept(self, listeners: list[trio.SocketListener], connections: Supervisor,
                      serving: trio.CancelScope) -> None:
        with serving:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_on, listener, connections)

    async def _accept_on(self, listener: trio.SocketListener, connections: Supervisor) -> None:
        # Not trio.serve_listeners: it closes each stream when its handler returns, and
        # here the handler is a supervised child that outlives the call that starts it.
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    _log.error("listen.accept_failed", uri=self.uri,
                               error=errno.errorcode.get(exc.errno or 0, str(exc.errno)))
                    await trio.sleep(_ACCEPT_RETRY_S)
                    continue
                await self._start_connection(connections, f"conn-{next(self._numbers)}",
                                             stream)

    async def _serve_stdio(self, connections: Supervisor, serving: trio.CancelScope, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        with _stdio_stream() as stream:
            ref = await self._start_connection(connections, "stdio", stream)
            task_status.started()
            if ref is None:
                return
            with serving:
                await ref.wait_exit()
                if self._on_stdio_closed is not None:
                    self._on_stdio_closed()

    async def _start_connection(self, connections: Supervisor, name: str,
                                stream: trio.abc.Stream) -> ActorRef | None:
        """Start a handler for `stream`; returns its ActorRef, or None if it could not
        (the supervisor is stopping: the stream is closed)."""
        handler = _Counted(self, self._make_handler(stream, stdio=name == "stdio"))
        spec = ChildSpec(name=name, factory=lambda: handler, restart=Restart.TEMPORARY,
                         shutdown=self._shutdown_ms)
        try:
            ref = await connections.start_child(spec)
        except CorralError:
            await trio.aclose_forcefully(stream)
            return None
        self.accepted += 1
        return ref


@final
class _Counted:
    """A connection's handler, counted in its listener's `open` while it runs."""

    def __init__(self, listener: Listener, handler: Child) -> None:
        self._listener = listener
        self._handler = handler

    async def run(self, ctx: Context, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._listener.open += 1
        try:
            await self._handler.run(ctx, task_status=task_status)
        finally:
            self._listener.open -= 1


async def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse to steal a live one.

    Raises:
        OSError: `path` is not a socket, or a server answers on it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    try:
        stream = await trio.open_unix_socket(path)
    except OSError:
        os.unlink(path)
        return
    await stream.aclose()
    raise OSError(f"{path} is in use by another server")


@contextlib.contextmanager
def _stdio_stream() -> Iterator[trio.StapledStream[Any, Any]]:
    """fd 0 and the original fd 1 as one stream; fd 1 points at stderr meanwhile."""
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    stream = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)),
                                trio.lowlevel.FdStream(os.dup(0)))
    os.dup2(2, 1)
    try:
        yield stream
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
