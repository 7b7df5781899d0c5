"""API keys over HTTP: the keys a request presents, checked in constant time, and the
refusal of a request without a good one.

`ApiKeys` guards the inference API (`server.api_keys`): with a key configured, every
route but `OPEN_PATHS` needs one, in `Authorization: Bearer <key>` (OpenAI's clients)
or `x-api-key: <key>` (Anthropic's). A refusal is a 401 in the shape of the API the
route belongs to. Its body is read and dropped first, within the bounds of any body
(`drain_body`): a reply that leaves a body unread ends the connection, and a client
still sending could lose the reply to the reset; read, the keep-alive connection is
kept. The admin routes (`admin.py`) check their own key the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Final, final

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.server.bodies import error_response, read_body
from corral.server.errors import ErrorShape

__all__ = ["OPEN_PATHS", "ApiKeys", "drain_body", "key_matches", "presented_key"]

OPEN_PATHS: Final = frozenset({"/health", "/metrics", "/v1/models/load", "/v1/models/unload"})
"""Paths `ApiKeys` lets through without a key: probes, and the admin routes, which
need the admin key instead."""

_BEARER: Final = "bearer "


def presented_key(headers: Headers) -> str:
    """The key a request presents: `Authorization: Bearer <key>`, else `x-api-key`;
    "" for none."""
    header = headers.get("authorization", "")
    if header.lower().startswith(_BEARER):
        return header[len(_BEARER):]
    return headers.get("x-api-key", "")


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Whether `given` is one of `keys`, in a time that depends on neither (each key is
    compared, as digests of one length)."""
    digest = hashlib.sha256(given.encode()).digest()
    matches = [hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
               for key in keys]
    return any(matches)


async def drain_body(request: Request, limit: int, timeout_ms: int) -> None:
    """Read a refused request's body and drop it (see the module).

    Raises:
        EngineClientError: what reading a body over the bounds raises (413, 408), for
            the refusal to be that instead, as it would be with the right key.
    """
    with contextlib.suppress(ClientDisconnect):  # nobody is left to answer
        await read_body(request, limit, timeout_ms)


@final
class ApiKeys:
    """ASGI middleware: a request for a path outside `OPEN_PATHS` without one of `keys`
    is refused with 401 (InvalidRequest, `details.unauthorized`) in the error shape
    `errors_for(path)` names. Inside the request-id middleware, so a refusal has its
    id and its access log line; inside CORS, so a browser's preflight is answered.

    Args:
        keys: the keys accepted; at least one.
        errors_for: the error shape of the API a path belongs to.
        max_body: the body bound of a refused request (`server.max_body_bytes`).
        body_timeout_ms: the time a refused request's body has to arrive.
    """

    def __init__(self, app: ASGIApp, *, keys: Sequence[str],
                 errors_for: Callable[[str], ErrorShape], max_body: int,
                 body_timeout_ms: int) -> None:
        self._app = app
        self._keys = tuple(keys)
        self._errors_for = errors_for
        self._max_body = max_body
        self._body_timeout_ms = body_timeout_ms

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        request = Request(scope, receive)
        if key_matches(presented_key(request.headers), self._keys):
            await self._app(scope, receive, send)
            return
        error: CorralError = EngineClientError(
            Code.INVALID_REQUEST, "a valid API key is required: send 'Authorization: "
            "Bearer <key>' or 'x-api-key: <key>' (server.api_keys)", {"unauthorized": True})
        try:
            await drain_body(request, self._max_body, self._body_timeout_ms)
        except CorralError as exc:
            error = exc
        errors = self._errors_for(scope["path"])
        await error_response(error, scope["state"]["request_id"], errors)(scope, receive, send)
