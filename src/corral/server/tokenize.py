"""POST /tokenize and /detokenize over HTTP, in vLLM's shapes (`protocol/tokenize.py`).

The model's tokenizer does the work through the runtime, as JSON-RPC's `tokenize` and
`detokenize` do: off the event loop (the engine's tokenizer thread, or its worker
process), bounded by the config's call timeout. Neither route generates, so neither
takes a stream slot.
"""

from __future__ import annotations

from typing import final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from corral.protocol.codec import convert_params
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from corral.runtime import Runtime
from corral.server.bodies import error_response, json_response, read_json

__all__ = ["TokenizeRoutes", "tokenize_routes"]


@final
class TokenizeRoutes:
    """The two endpoints over one runtime.

    Args:
        body_timeout_ms: a request's whole body must arrive within this.
    """

    def __init__(self, runtime: Runtime, *, body_timeout_ms: int) -> None:
        self._runtime = runtime
        self._body_timeout_ms = body_timeout_ms
        self._max_body = runtime.config.server.max_body_bytes

    async def tokenize(self, request: Request) -> Response:
        """200 with the ids, their count and the model's context.

        Errors: 400 for a bad body (neither or both of prompt and messages included),
        404 ModelNotLoaded, 400 TokenizerError (no chat template, say).
        """
        try:
            body = convert_params(await read_json(request, self._max_body,
                                                  self._body_timeout_ms), TokenizeRequest)
            if (body.prompt is None) == (body.messages is None):
                raise EngineClientError(Code.INVALID_PARAMS,
                                        "prompt: give exactly one of prompt and messages",
                                        {"field": "prompt"})
            if body.messages is not None:
                ids = await self._runtime.tokenize_chat(
                    body.model, [message.to_message() for message in body.messages])
            else:
                assert body.prompt is not None
                ids = await self._runtime.tokenize(body.model, body.prompt,
                                                   add_special_tokens=body.add_special_tokens)
        except CorralError as error:
            return error_response(error, request.state.request_id)
        return json_response(TokenizeResponse(len(ids), self._context(body.model), ids))

    async def detokenize(self, request: Request) -> Response:
        """200 with the text of the ids.

        Errors: 400 for a bad body, 404 ModelNotLoaded, 400 TokenizerError (an id
        outside the vocabulary).
        """
        try:
            body = convert_params(await read_json(request, self._max_body,
                                                  self._body_timeout_ms), DetokenizeRequest)
            text = await self._runtime.detokenize(body.model, body.tokens)
        except CorralError as error:
            return error_response(error, request.state.request_id)
        return json_response(DetokenizeResponse(text))

    def _context(self, model: str | None) -> int | None:
        """The context of the model that tokenized (the only one, when none is named)."""
        models = self._runtime.list_models()
        for description in models:
            if description.alias == model or (model is None and len(models) == 1):
                return description.info.max_context if description.info else None
        return None


def tokenize_routes(runtime: Runtime, *, body_timeout_ms: int) -> list[Route]:
    """The two routes, for the app's route table."""
    routes = TokenizeRoutes(runtime, body_timeout_ms=body_timeout_ms)
    return [Route("/tokenize", routes.tokenize, methods=["POST"]),
            Route("/detokenize", routes.detokenize, methods=["POST"])]
