"""Hypercorn's server of one HTTP connection, without two ways it loses a client.

Hypercorn 0.18's trio `TCPServer` runs an idle timer (`keep_alive_timeout`) from the
moment a connection is accepted until its first request is parsed, and after each
reply until the next request:

- at the client's EOF its reader ends, but the idle timer keeps the connection's task
  group open until it fires, so a server whose clients come and go quickly sits at its
  connection cap with sockets nobody can use;
- when the timer fires it closes the connection without a reply, even when the
  request has arrived and only waits in the socket to be read. On a loaded machine a
  burst of connections can wait longer than the timer between accept and the first
  read: 300 simultaneous streams lost 16 to 114 with no reply at all (EOF or a reset).

`ConnectionServer` stops the timer at the client's EOF, and closes an idle connection
only when nothing it was sent waits to be read and nothing arrived since the timer
began (its reader may hold bytes it has not parsed yet). Everything else is Hypercorn's.
"""

from __future__ import annotations

import array
import fcntl
import termios

import trio
from hypercorn.trio.tcp_server import TCPServer

__all__ = ["ConnectionServer"]


class ConnectionServer(TCPServer):
    """Hypercorn's `TCPServer` for one connection, as the module's docstring says."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()  # the client sent EOF: no request can follow

    async def _idle_timeout(self) -> None:
        """Close the connection once a whole `keep_alive_timeout` has passed with nothing
        received or waiting unread, or at once when the server stops. Cancelled (a
        request began), it closes nothing. Runs on `LingeringStream` (`received`)."""
        received = self.stream.received
        while not self.context.terminated.is_set():
            with trio.move_on_after(self.config.keep_alive_timeout):
                await self.context.terminated.wait()
            if self.stream.received == received and not _unread_bytes(self.stream.socket):
                break
            received = self.stream.received  # a request is arriving: wait for it
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


def _unread_bytes(sock: trio.socket.SocketType) -> int:
    """How many bytes the client sent that nobody has read yet (0 if unknown)."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    except OSError:
        return 0
    return count[0]
