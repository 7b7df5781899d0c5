"""Models over HTTP: POST /v1/models/load and /v1/models/unload, behind an API key.

Off unless `server.admin_api_key` is set: then a request must carry
`Authorization: Bearer <key>` (or `x-api-key: <key>`). A missing or wrong key is a 401
(InvalidRequest, with `details.unauthorized`) and changes nothing; with no key
configured the routes answer 404 saying how to turn them on. A refused request's body
is read and dropped before the refusal (within the bounds of any body), so the client
always gets the refusal and keeps its connection. The bodies are
JSON-RPC's `load_model` / `unload_model` params, decoded by the same Structs, so both
transports take the same fields and refuse the same values.

A load answers once the model is loaded, or with the typed error of a load that failed.
Cancelled (the server stopping), the half-loaded model is stopped and forgotten, as
`Runtime.load_model` does when its caller is cancelled; nothing is left half there.
"""

from __future__ import annotations

import time
from typing import NoReturn, final

from starlette.requests import Request
from starlette.responses import Response

from corral.protocol.codec import convert_params
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.jsonrpc import LoadModelParams, UnloadModelParams
from corral.protocol.openai import ModelDeleted
from corral.runtime import Runtime
from corral.server.auth import drain_body, key_matches, presented_key
from corral.server.bodies import error_response, json_response, read_json
from corral.server.routes import model_card

__all__ = ["AdminRoutes"]


@final
class AdminRoutes:
    """The two admin endpoints over one runtime."""

    def __init__(self, runtime: Runtime, api_key: str | None, *, body_timeout_ms: int) -> None:
        self._runtime = runtime
        self._api_key = api_key
        self._body_timeout_ms = body_timeout_ms
        self._max_body = runtime.config.server.max_body_bytes

    async def load(self, request: Request) -> Response:
        """Load a model (`path`, `alias`, `fallbacks`); 200 with its card once loaded.

        Errors: 401 for a bad key; 400 InvalidParams for a bad body or a taken alias;
        400 ModelLoadError for a path that leads to no model or a model that cannot load.
        """
        try:
            params = convert_params(await self._authorized_body(request), LoadModelParams)
            loaded = await self._runtime.load_model(params.path, alias=params.alias,
                                                    fallbacks=tuple(params.fallbacks))
        except CorralError as error:
            return error_response(error, request.state.request_id)
        return json_response(model_card(loaded, int(time.time())))

    async def unload(self, request: Request) -> Response:
        """Unload a model (`alias`); its open streams end with ModelNotLoaded (404).

        Errors: 401 for a bad key; 400 for a bad body; 404 ModelNotLoaded.
        """
        try:
            params = convert_params(await self._authorized_body(request), UnloadModelParams)
            await self._runtime.unload_model(params.alias)
        except CorralError as error:
            return error_response(error, request.state.request_id)
        return json_response(ModelDeleted(id=params.alias))

    async def _authorized_body(self, request: Request) -> object:
        """The body, once the key is checked.

        A refused request's body is read and dropped before the refusal, within the
        bounds of any body: a reply that leaves the body unread ends the connection,
        and a client still sending could lose the reply to the reset; read, the
        connection is kept. A body over the bounds is refused as such (413, 408), as it
        would be with the right key.

        Raises:
            EngineClientError: MethodNotFound when the admin API is off, InvalidRequest
                (sent as 401) for a missing or wrong key, or what reading the body raises.
        """
        if self._api_key is None:
            await self._refuse(request, EngineClientError(
                Code.METHOD_NOT_FOUND,
                f"{request.url.path}: the admin API is off; set server.admin_api_key"))
        if not key_matches(presented_key(request.headers), [self._api_key]):
            await self._refuse(request, EngineClientError(
                Code.INVALID_REQUEST, "a valid admin API key is required: "
                "send 'Authorization: Bearer <server.admin_api_key>'", {"unauthorized": True}))
        return await read_json(request, self._max_body, self._body_timeout_ms)

    async def _refuse(self, request: Request, error: EngineClientError) -> NoReturn:
        """Raise `error` once the body is read and dropped (see `_authorized_body`)."""
        await drain_body(request, self._max_body, self._body_timeout_ms)
        raise error
