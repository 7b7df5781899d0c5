"""OpenAI's Responses API over HTTP: POST /v1/responses (JSON, or typed SSE events with
`stream`), and GET and DELETE /v1/responses/{id} of a stored response.

POST runs on the shared exchange (`exchange.ExchangeEndpoint`), as chat completions do: a
client that goes away cancels its generation, an error before the first event is an
HTTP status in OpenAI's error shape, and one after it is the stream's last event,
`response.failed`. A finished response (completed or incomplete) is stored unless the
request says `store: false`, so that `previous_response_id` can continue it: the
store keeps each response's conversation (input and output items, never
`instructions`) in memory, bounded by `server.responses.max_stored`. The store belongs
to the runtime, not to the HTTP server, so a restarted HTTP server still finds it.
"""

from __future__ import annotations

import collections
import time
import uuid
import weakref
from typing import Any, Final, final

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from corral.metrics import Metrics
from corral.protocol.codec import convert_params
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.messages import GenerateParams
from corral.protocol.responses import InputItem, ResponsesRequest
from corral.protocol.responses_output import ResponseDeleted, ResponseObject
from corral.runtime import Runtime
from corral.server.bodies import error_response, json_response
from corral.server.exchange import ClientStreams, Exchange, ExchangeEndpoint, fallback_headers
from corral.server.responses_shape import ResponseShape, as_input_items

__all__ = ["ResponseStore", "ResponsesEndpoint", "StoredResponse", "responses_routes",
           "store_of"]

_METHOD: Final = "responses"


class StoredResponse(msgspec.Struct, frozen=True):
    """A finished response and the conversation it ends: every input item up to it
    (those of the responses it continued included) and its output items."""

    response: ResponseObject
    conversation: list[InputItem]


@final
class ResponseStore:
    """The newest `capacity` stored responses, by id; reading one makes it newest.

    Args:
        capacity: how many are kept; 0 keeps none.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._stored: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._stored)

    def put(self, stored: StoredResponse) -> None:
        """Keep `stored`, dropping the least recently used past the capacity."""
        if self.capacity == 0:
            return
        self._stored[stored.response.id] = stored
        self._stored.move_to_end(stored.response.id)
        while len(self._stored) > self.capacity:
            self._stored.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._stored.get(response_id)
        if stored is not None:
            self._stored.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forget a response; False when it was not kept."""
        return self._stored.pop(response_id, None) is not None


_STORES: weakref.WeakKeyDictionary[Runtime, ResponseStore] = weakref.WeakKeyDictionary()


def store_of(runtime: Runtime) -> ResponseStore:
    """The response store of `runtime` (made on first use, sized by
    `server.responses.max_stored`); it lives as long as the runtime."""
    store = _STORES.get(runtime)
    if store is None:
        store = _STORES[runtime] = ResponseStore(runtime.config.server.responses.max_stored)
    return store


def _not_stored(response_id: str, field: str | None = None) -> EngineClientError:
    """A response id the store does not hold: 400 naming `field` in a request body,
    else (a path) 404 (MethodNotFound, the table's code for what is not there)."""
    message = f"response {response_id!r} not found (not stored, or dropped from the store)"
    if field is not None:
        return EngineClientError(Code.INVALID_PARAMS, f"{field}: {message}", {"field": field})
    return EngineClientError(Code.METHOD_NOT_FOUND, message, {"response_id": response_id})


class _Job(msgspec.Struct, frozen=True):
    request: ResponsesRequest
    params: GenerateParams
    previous: list[InputItem]
    shape: ResponseShape


@final
class ResponsesEndpoint(ExchangeEndpoint[_Job]):
    """POST /v1/responses (see `ExchangeEndpoint` and the module)."""

    def __init__(self, runtime: Runtime, metrics: Metrics, store: ResponseStore, *,
                 body_timeout_ms: int, clients: ClientStreams) -> None:
        super().__init__(runtime, metrics, _METHOD, body_timeout_ms=body_timeout_ms,
                         clients=clients)
        self._store = store

    def job(self, body: Any, request_id: str, client: str) -> _Job:
        """Raises InvalidParams naming the field (an unknown `previous_response_id`)."""
        request = convert_params(body, ResponsesRequest)
        previous: list[InputItem] = []
        if request.previous_response_id is not None:
            stored = self._store.get(request.previous_response_id)
            if stored is None:
                raise _not_stored(request.previous_response_id, "previous_response_id")
            previous = stored.conversation
        params = request.to_generate_params(previous, request_id=request_id, client=client)
        shape = ResponseShape(request, params, f"resp_{uuid.uuid4().hex}", int(time.time()))
        return _Job(request, params, previous, shape)

    async def answer(self, job: _Job, exchange: Exchange) -> None:
        if job.request.stream:
            await self._stream(job, exchange)
        else:
            await self._whole(job, exchange)

    async def _stream(self, job: _Job, exchange: Exchange) -> None:
        shape = job.shape

        def failed(error: CorralError) -> tuple[msgspec.Struct, str]:
            event = shape.failed(error)
            return event, event.type

        async with self._runtime.choices(job.params) as choices:
            exchange.stream = choices
            async for chunk in choices:
                if not exchange.streaming:
                    exchange.stream_failure = failed
                    await exchange.start_stream(fallback_headers(choices))
                    for event in shape.opening(choices.model):
                        await exchange.event(event, event.type)
                if chunk.finish_reason is None:
                    events = shape.chunk(chunk)
                else:
                    events, response = shape.ending(chunk, choices.usage)
                    exchange.succeeded()
                    self._keep(job, response)
                for event in events:
                    await exchange.event(event, event.type)
        await exchange.end_stream(done=False)

    async def _whole(self, job: _Job, exchange: Exchange) -> None:
        completion, headers = await self.complete(job.params, exchange)
        response = job.shape.whole(completion)
        self._keep(job, response)
        await exchange.reply(response, headers)

    def _keep(self, job: _Job, response: ResponseObject) -> None:
        if job.request.store:
            self._store.put(StoredResponse(response, [
                *job.previous, *job.request.input_items(), *as_input_items(response.output)]))


@final
class _StoredRoutes:
    """GET and DELETE /v1/responses/{response_id}."""

    def __init__(self, store: ResponseStore) -> None:
        self._store = store

    async def get(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        stored = self._store.get(response_id)
        if stored is None:
            return error_response(_not_stored(response_id), request.state.request_id)
        return json_response(stored.response)

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if not self._store.delete(response_id):
            return error_response(_not_stored(response_id), request.state.request_id)
        return json_response(ResponseDeleted(response_id))


def responses_routes(runtime: Runtime, metrics: Metrics, *, body_timeout_ms: int,
                     clients: ClientStreams) -> list[Route]:
    """The Responses API's routes, for the app's route table."""
    store = store_of(runtime)
    stored = _StoredRoutes(store)
    return [
        Route("/v1/responses", ResponsesEndpoint(runtime, metrics, store,
                                                 body_timeout_ms=body_timeout_ms,
                                                 clients=clients), methods=["POST"]),
        Route("/v1/responses/{response_id}", stored.get, methods=["GET"]),
        Route("/v1/responses/{response_id}", stored.delete, methods=["DELETE"]),
    ]
