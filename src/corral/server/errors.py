"""corral's errors over HTTP, whatever the API: the status and headers from the one
error table, and the shape (`ErrorShape`) each API gives the body.

Every API answers an error with the same status and headers, so a client error is
never a 5xx on any of them; only the body differs (OpenAI's `{"error": {...}}`,
Anthropic's `{"type": "error", ...}`, Ollama's `{"error": "..."}`), and the event a
stream that fails ends with. Pure functions: this module never does I/O and never
knows of ASGI.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import final

import msgspec

from corral.protocol.errors import Code, CorralError, EngineClientError

__all__ = ["ErrorShape", "drain_wait_ms", "error_headers", "internal_error", "retry_after",
           "status_of", "with_drain_wait"]


@final
@dataclasses.dataclass(frozen=True)
class ErrorShape:
    """How one API tells a client of an error.

    Attributes:
        body: the error's body, given the error and the request id: the whole reply
            before a stream starts, and the data of the event that ends a stream.
        sse_event: the SSE `event:` name of that last event; None: a bare `data:`
            line (or a stream that is not SSE).
    """

    body: Callable[[CorralError, str], msgspec.Struct]
    sse_event: str | None = None


def status_of(error: CorralError) -> int:
    """The HTTP status of an error: the table's, except 503 while the server shuts down
    (the table has no code of its own for that; the error is a retryable ServerError),
    408 for a request body that did not arrive in time (the client's Timeout), 413 for
    one over `server.max_body_bytes` (InvalidRequest), 401 for a request without the
    right API key (InvalidRequest, `details.unauthorized`), and 400 for a model load
    that retrying cannot fix (a path that leads to no model, or a model the engine
    cannot load): the caller's choice of model, not a server fault."""
    if error.details.get("shutting_down"):
        return 503
    if "body_timeout_ms" in error.details:
        return 408
    if "max_body_bytes" in error.details:
        return 413
    if error.details.get("unauthorized"):
        return 401
    if error.code is Code.MODEL_LOAD_ERROR and error.retryable is False:
        return 400
    return error.spec.http


def error_headers(error: CorralError) -> list[tuple[bytes, bytes]]:
    """Retry-After (whole seconds, rounded up) for the errors that carry a wait;
    Connection: close after a body that did not arrive in time or was too large (its
    rest may follow, unread)."""
    headers = []
    retry_after_ms = error.details.get("retry_after_ms")
    if (error.code in (Code.OVERLOADED, Code.CIRCUIT_OPEN) or error.details.get(
            "shutting_down")) and isinstance(retry_after_ms, int | float):
        headers.append(retry_after(retry_after_ms))
    if "body_timeout_ms" in error.details or "max_body_bytes" in error.details:
        headers.append((b"connection", b"close"))
    return headers


def retry_after(ms: float) -> tuple[bytes, bytes]:
    """The Retry-After header for a wait of `ms`: whole seconds, rounded up."""
    return (b"retry-after", str(max(0, math.ceil(ms / 1000.0))).encode())


def drain_wait_ms(drain_ms: int) -> int:
    """The wait a draining server's 503 tells: the drain's length (at least a second),
    the earliest a restarted server could answer at this address."""
    return max(drain_ms, 1000)


def with_drain_wait(error: CorralError, drain_ms: int) -> CorralError:
    """A shutting-down error with the wait its 503 tells the client; any other error
    as it is."""
    if not error.details.get("shutting_down") or "retry_after_ms" in error.details:
        return error
    return EngineClientError(error.code, error.message,
                             {**error.details, "retry_after_ms": drain_wait_ms(drain_ms)},
                             retryable=error.retryable)


def internal_error(exc: BaseException) -> CorralError:
    """What a client is told of a bug in the HTTP server: its type only."""
    return EngineClientError(Code.INTERNAL_ERROR,
                             f"internal error in the HTTP server: {type(exc).__name__}")
