"""The HTTP API's small routes, which generate nothing: GET /v1/models[/{id}], /health
and /metrics.

Each speaks to the runtime facade only and holds no state a restart of the HTTP
server would lose. The generation endpoints are each API's (`exchange.py` says how
they are built); this module never shapes an error body of its own.
"""

from __future__ import annotations

import time
from typing import final

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from corral.metrics import Metrics
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.openai import ModelCard, ModelList
from corral.runtime import ModelDescription, Runtime
from corral.server.bodies import error_response, json_response
from corral.server.errors import drain_wait_ms, retry_after

__all__ = ["Routes", "model_card"]


def model_card(model: ModelDescription, created: int) -> ModelCard:
    """A model as GET /v1/models lists it."""
    return ModelCard(id=model.alias, created=created, root=model.path,
                     max_model_len=model.info.max_context if model.info else None,
                     state=model.state, breaker=model.breaker)


@final
class Routes:
    """GET /v1/models, /v1/models/{id}, /health and /metrics."""

    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._created = int(time.time())

    def _cards(self) -> list[ModelCard]:
        return [model_card(m, self._created) for m in self._runtime.list_models()]

    async def models(self, request: Request) -> Response:
        return json_response(ModelList(self._cards()))

    async def model(self, request: Request) -> Response:
        """The model's card, or 404 (ModelNotLoaded)."""
        alias = request.path_params["model"]
        for card in self._cards():
            if card.id == alias:
                return json_response(card)
        return error_response(
            EngineClientError(Code.MODEL_NOT_LOADED, f"model {alias!r} is not loaded",
                              {"model": alias}), request.state.request_id)

    async def health(self, request: Request) -> Response:
        """200, or 503 with the reasons; while draining, with the drain's Retry-After."""
        health = self._runtime.health()
        body = {"status": "ok" if health.ok else "unavailable", **msgspec.to_builtins(health)}
        response = json_response(body, 200 if health.ok else 503)
        if not health.ok and self._runtime.draining:
            response.raw_headers.append(
                retry_after(drain_wait_ms(self._runtime.config.server.drain_timeout_ms)))
        return response

    async def metrics(self, request: Request) -> Response:
        return Response(await self._metrics.render(), media_type=CONTENT_TYPE_LATEST)
