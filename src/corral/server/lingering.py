"""The socket under one HTTP connection, made to end cleanly whoever ends it.

Hypercorn 0.18's trio `TCPServer` ends a connection with `send_eof` then `aclose`, from
whichever task decides to (its reader, on a client that breaks the protocol; the app's
task, after a reply with `Connection: close`), without its send lock. Two faults came of
that, both seen under hostile clients:

- an EOF racing a send of another task raised BusyResourceError out of the send (trio
  refuses two senders at once). Out of the reader, it crashed the whole HTTP server:
  every connection dropped, then a restart;
- closing a socket the client is still sending on (a body refused before it was all
  read: 401, 408, 413) makes the kernel answer with a reset, which destroys the reply
  in the client's receive buffer: it saw ECONNRESET instead of its status.

`LingeringStream` gives Hypercorn a stream on which neither can happen: EOF is sent only
between sends, `aclose` interrupts the reads and sends in progress instead of closing
the socket, and the owner ends the connection with `linger_and_close` once Hypercorn is
done, as nginx's lingering close does: the write side is shut (the reply is complete),
what the client still sends is read and dropped until it stops, and only then is the
socket closed. It never reads while Hypercorn's reader does, and never waits once the
server is cancelled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, final

import trio

__all__ = ["LINGER_QUIET_S", "LINGER_S", "LingeringStream"]

LINGER_S: Final = 5.0
"""The longest a closing connection reads what its client still sends."""
LINGER_QUIET_S: Final = 0.25
"""A closing connection whose client sends nothing for this long is closed."""
_RECEIVE_BYTES: Final = 65536


@final
class LingeringStream(trio.abc.HalfCloseableStream):
    """A socket stream for one Hypercorn connection (see the module's docstring).

    Hypercorn reads `socket` for the peer's address; it finds no `do_handshake`, so it
    treats the stream as plain TCP, as it does a `trio.SocketStream`.

    Args:
        stream: the accepted connection; this object owns it from now on.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.socket = stream.socket
        self._busy: set[trio.CancelScope] = set()  # reads and sends in progress
        self._sending = False
        self._eof = False  # no more sends: EOF asked for
        self._eof_after_send = False  # asked for while a send ran: due when it ends
        self._write_shut = False
        self._closed = False  # Hypercorn is done with the stream
        self.received = 0  # bytes the client sent that were read

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        """A read or send that `aclose` ends with ClosedResourceError."""
        if self._closed:
            raise trio.ClosedResourceError("the connection is closing")
        scope = trio.CancelScope()
        self._busy.add(scope)
        try:
            with scope:
                yield
        finally:
            self._busy.discard(scope)
        if scope.cancelled_caught:
            raise trio.ClosedResourceError("the connection is closing")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of `data`.

        Raises:
            trio.ClosedResourceError: EOF was asked for, or `aclose` came first or
                meanwhile (part of `data` may have gone).
            trio.BrokenResourceError: the client is gone.
        """
        if self._eof:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        self._sending = True
        try:
            with self._interruptible():
                await self._stream.send_all(data)
        finally:
            self._sending = False
            if self._eof_after_send:
                self._shut_write()

    async def wait_send_all_might_not_block(self) -> None:
        with self._interruptible():
            await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Tell the client no more data follows: now, or as soon as the send in
        progress ends. Idempotent; never raises BusyResourceError."""
        self._eof = True
        if self._sending:
            self._eof_after_send = True
        else:
            self._shut_write()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """What the client sent next; b"" at its EOF.

        Raises:
            trio.ClosedResourceError: `aclose` came first or meanwhile.
            trio.BrokenResourceError: the client is gone.
        """
        data = b""
        with self._interruptible():
            data = await self._stream.receive_some(max_bytes or _RECEIVE_BYTES)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        """Hypercorn is done: its reads and sends in progress end with
        ClosedResourceError, later ones fail at once. The socket stays open for
        `linger_and_close`."""
        self._closed = True
        for scope in self._busy:
            scope.cancel()
        await trio.lowlevel.checkpoint()

    async def linger_and_close(self) -> None:
        """End the connection once Hypercorn is done with it: shut the write side, read
        and drop what the client still sends until it sends EOF, is quiet for
        `LINGER_QUIET_S`, or `LINGER_S` has passed, then close the socket.

        Cancelled, it closes the socket at once; it closes it however it returns.
        """
        self._closed = True
        try:
            self._shut_write()
            with trio.move_on_after(LINGER_S):
                while True:
                    with trio.move_on_after(LINGER_QUIET_S) as quiet:
                        data = await self._stream.receive_some(_RECEIVE_BYTES)
                    if quiet.cancelled_caught or not data:
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(self._stream)

    def _shut_write(self) -> None:
        if self._write_shut:
            return
        self._write_shut = True
        try:
            self._stream.socket.shutdown(trio.socket.SHUT_WR)
        except OSError:
            pass  # the client is gone: nothing is left to tell it
