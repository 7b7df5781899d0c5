"""The Anthropic Messages API's endpoints: POST /v1/messages (on the shared exchange,
`exchange.ExchangeEndpoint`, so a disconnect cancels it and an error mid-stream is its
last event, as on the OpenAI routes) and POST /v1/messages/count_tokens.

The stream is Anthropic's event sequence: `message_start`, `ping`, per block
`content_block_start`, `content_block_delta` (`text_delta`, `input_json_delta`),
`content_block_stop`, then `message_delta` (stop reason, usage) and `message_stop`; an
error after the start is an `error` event. Shapes and errors are `anthropic.py`'s.
"""

from __future__ import annotations

from typing import Any, ClassVar, final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from corral.metrics import Metrics
from corral.protocol.anthropic import CountTokensRequest, CountTokensResponse, StreamEvent
from corral.protocol.codec import convert_params
from corral.protocol.errors import CorralError
from corral.protocol.messages import FinishReason
from corral.runtime import Runtime
from corral.server.anthropic import (
    ANTHROPIC_ERRORS,
    MessagesJob,
    MessagesShape,
    event_name,
    messages_job,
    stop_reason,
    stop_sequence_in,
)
from corral.server.bodies import error_response, json_response, read_json
from corral.server.errors import ErrorShape
from corral.server.exchange import (
    ClientStreams,
    Exchange,
    ExchangeEndpoint,
    client_address,
    fallback_headers,
)

__all__ = ["CountTokens", "MessagesEndpoint", "anthropic_routes"]


async def _stop_sequence(runtime: Runtime, model: str, token_ids: list[int],
                         reason: FinishReason | None, stops: list[str]) -> str | None:
    """The stop sequence that ended the reply, if one did: the engine reports a stop
    string and the end of the model's turn alike as "stop", so the generated tokens are
    decoded whole and searched. A model gone meanwhile is taken as the end of the turn."""
    if reason != "stop" or not stops:
        return None
    try:
        generated = await runtime.detokenize(model, token_ids)
    except CorralError:
        return None
    return stop_sequence_in(generated, stops)


async def _send(exchange: Exchange, events: list[StreamEvent]) -> None:
    for event in events:
        await exchange.event(event, event_name(event))


@final
class MessagesEndpoint(ExchangeEndpoint[MessagesJob]):
    """POST /v1/messages (see `ExchangeEndpoint`): errors in Anthropic's shape, a
    stream's events named by their type."""

    errors: ClassVar[ErrorShape] = ANTHROPIC_ERRORS

    def __init__(self, runtime: Runtime, metrics: Metrics, *, body_timeout_ms: int,
                 clients: ClientStreams) -> None:
        super().__init__(runtime, metrics, "messages", body_timeout_ms=body_timeout_ms,
                         clients=clients)

    def job(self, body: Any, request_id: str, client: str) -> MessagesJob:
        return messages_job(body, request_id, client)

    async def answer(self, job: MessagesJob, exchange: Exchange) -> None:
        if job.stream:
            await self._stream(job, exchange)
        else:
            await self._whole(job, exchange)

    async def _stream(self, job: MessagesJob, exchange: Exchange) -> None:
        shape = MessagesShape(job.message_id)
        async with self._runtime.choices(job.params) as choices:
            exchange.stream = choices
            async for chunk in choices:
                if not exchange.streaming:
                    await exchange.start_stream(fallback_headers(choices))
                    await _send(exchange, shape.opening(choices.model, choices.usage))
                await _send(exchange, shape.chunk(chunk))
                if chunk.finish_reason is None:
                    continue
                stop = await _stop_sequence(self._runtime, choices.model,
                                            choices.streams[0].token_ids,
                                            chunk.finish_reason, job.stop_sequences)
                reason = stop_reason(chunk.finish_reason, stop)
                exchange.succeeded()
                await _send(exchange, shape.ending(reason, stop, choices.usage))
        await exchange.end_stream(done=False)

    async def _whole(self, job: MessagesJob, exchange: Exchange) -> None:
        completion, headers = await self.complete(job.params, exchange)
        stop = await _stop_sequence(self._runtime, completion.model, completion.token_ids,
                                    completion.finish_reason, job.stop_sequences)
        await exchange.reply(MessagesShape(job.message_id).whole(
            completion.model, completion.text, completion.tool_calls,
            stop_reason(completion.finish_reason, stop), stop, completion.usage), headers)


@final
class CountTokens:
    """POST /v1/messages/count_tokens (`count`): `{"input_tokens": N}`, the prompt's
    length as the model's chat template renders it with the tools; errors in
    Anthropic's shape."""

    def __init__(self, runtime: Runtime, *, body_timeout_ms: int) -> None:
        self._runtime = runtime
        self._max_body = runtime.config.server.max_body_bytes
        self._body_timeout_ms = body_timeout_ms

    async def count(self, request: Request) -> Response:
        request_id: str = request.state.request_id
        try:
            body = await read_json(request, self._max_body, self._body_timeout_ms)
            params = convert_params(body, CountTokensRequest).to_generate_params(
                request_id=request_id, client=f"http:{client_address(request.scope)}")
            count = await self._runtime.count_prompt_tokens(params)
        except CorralError as error:
            return error_response(error, request_id, ANTHROPIC_ERRORS)
        return json_response(CountTokensResponse(count))


def anthropic_routes(runtime: Runtime, metrics: Metrics, *, body_timeout_ms: int,
                     clients: ClientStreams) -> list[Route]:
    """The Messages API's routes, for the app's route table."""
    count_tokens = CountTokens(runtime, body_timeout_ms=body_timeout_ms)
    return [Route("/v1/messages", MessagesEndpoint(runtime, metrics,
                                                   body_timeout_ms=body_timeout_ms,
                                                   clients=clients), methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens.count, methods=["POST"])]
