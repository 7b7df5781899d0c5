"""Plain HTTP bodies, whatever the API: a request's body read within its bounds, and a
Struct or a corral error sent as one whole response.

Every route reads its body through `read_json` (or `read_body`), so the bounds
(`server.max_body_bytes`, the body timeout) and their errors are the same on every
API. This module never shapes an error body itself (that is each API's `ErrorShape`)
and never calls the runtime.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response

from corral.protocol.codec import decode_json
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.server.errors import ErrorShape, error_headers, status_of
from corral.server.openai import OPENAI_ERRORS

__all__ = ["error_response", "json_response", "read_body", "read_json"]

_encode = msgspec.json.Encoder().encode


def error_response(error: CorralError, request_id: str,
                   errors: ErrorShape = OPENAI_ERRORS) -> Response:
    """`error` as a whole response: its status, its API's error body (OpenAI's by
    default), its headers."""
    response = Response(_encode(errors.body(error, request_id)), status_of(error),
                        media_type="application/json")
    response.raw_headers.extend(error_headers(error))
    return response


def json_response(data: Any, status: int = 200) -> Response:
    """`data` (a Struct or builtins) as a JSON response."""
    return Response(_encode(data), status, media_type="application/json")


async def read_json(request: Request, limit: int, timeout_ms: int) -> Any:
    """The request body as builtins, read within `timeout_ms`; one whose Content-Length
    is over `limit` is refused before any of it is read.

    Raises:
        EngineClientError: InvalidRequest for a body over `limit` bytes (sent as 413,
            `details["max_body_bytes"]`), ParseError for one that is not JSON, Timeout
            (`details["body_timeout_ms"]`, sent as 408) for one that did not arrive in
            time.
        ClientDisconnect: the client went away while sending it.
    """
    return decode_json(await read_body(request, limit, timeout_ms))


async def read_body(request: Request, limit: int, timeout_ms: int) -> bytes:
    """The request body, read as `read_json` says (which see), not decoded."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, f"{int(declared):,} bytes declared")
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout_ms / 1000.0) as reading:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _too_large(limit, f"over {limit:,} bytes sent")
            parts.append(part)
    if reading.cancelled_caught:
        raise EngineClientError(
            Code.TIMEOUT, f"body: {size} bytes arrived in {timeout_ms / 1000.0:g}s, not all",
            {"body_timeout_ms": timeout_ms})
    return b"".join(parts)


def _too_large(limit: int, seen: str) -> EngineClientError:
    return EngineClientError(
        Code.INVALID_REQUEST,
        f"body: larger than the {limit:,} bytes this server accepts ({seen}; "
        "server.max_body_bytes)", {"max_body_bytes": limit})
