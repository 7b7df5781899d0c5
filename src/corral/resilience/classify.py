"""Error classification: the one mapping from any exception to a code of the table.

`code_of` gives the code that retry policies, breakers and fallbacks decide by;
`classify` adds the table's category, severity, retryability and suggestion. Works on
exceptions of trio, asyncio, anyio and httpx as well as corral's own; never raises.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import socket
import ssl
import sys

import msgspec
import trio

from corral.protocol.errors import ERROR_TABLE, Category, Code, CorralError, Severity

# An OSError with one of these numbers is the network failing between here and the
# peer, not a bug in the caller: the same call may well work a moment later. (A reset,
# refused or aborted connection is already a `ConnectionError` subclass.)
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "ENETRESET", "EHOSTDOWN")
    if hasattr(errno, name)
)


class Classification(msgspec.Struct, frozen=True):
    """What `classify` says about an exception: its code and that code's row."""

    code: Code
    category: Category
    severity: Severity
    retryable: bool
    suggestion: str


def code_of(error: BaseException) -> Code:
    """The code of any exception: the one mapping `classify`, retry policies and breakers
    share.

    A corral error has its own code. Of other exceptions, timeouts (`builtins.
    TimeoutError`, which `asyncio.TimeoutError` and `socket.timeout` are, `trio.
    TooSlowError`, httpx's `TimeoutException`) are Timeout; a broken or refused
    connection (`ConnectionError`, so `ConnectionResetError`, `BrokenPipeError` and
    `ConnectionRefusedError`, trio's and anyio's `BrokenResourceError`, httpx's
    `NetworkError`, `RemoteProtocolError` and `ProxyError`) is TransportError, and so
    is a network that cannot be reached or a name that does not resolve (an `OSError`
    with `EHOSTUNREACH`, `ENETUNREACH`, `ENETDOWN` or `EHOSTDOWN`, `socket.gaierror`)
    and a failed TLS exchange (`ssl.SSLError`); cancellation (trio's, asyncio's) is
    Cancelled; anything else is UnknownError.
    httpx is only consulted once something has imported it: an httpx error cannot exist
    before then.
    """
    if isinstance(error, CorralError):
        return error.code
    if isinstance(error, builtins.TimeoutError | trio.TooSlowError):
        return Code.TIMEOUT
    if isinstance(error, ConnectionError | trio.BrokenResourceError
                  | socket.gaierror | ssl.SSLError):
        return Code.TRANSPORT_ERROR
    if isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS:
        return Code.TRANSPORT_ERROR
    if isinstance(error, trio.Cancelled | asyncio.CancelledError):
        return Code.CANCELLED
    anyio = sys.modules.get("anyio")
    if anyio is not None and isinstance(error, anyio.BrokenResourceError):
        return Code.TRANSPORT_ERROR
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        if isinstance(error, httpx.TimeoutException):
            return Code.TIMEOUT
        if isinstance(error, httpx.NetworkError | httpx.RemoteProtocolError
                      | httpx.ProxyError):
            return Code.TRANSPORT_ERROR
    return Code.UNKNOWN_ERROR


def classify(error: BaseException) -> Classification:
    """Category, severity, retryability and a recovery suggestion for any exception.

    The code is `code_of(error)`. A corral error is retryable by its own flag (the
    table's value, unless the raising site decided, as it does for the "by cause"
    codes); any other exception by the table's row for its code, where "by cause" is
    no: an UnknownError gives no reason to think a second try would differ.
    """
    code = code_of(error)
    spec = ERROR_TABLE[code]
    retryable = error.retryable if isinstance(error, CorralError) else bool(spec.retryable)
    return Classification(code, spec.category, spec.severity, retryable, spec.suggestion)
