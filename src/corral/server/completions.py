"""POST /v1/completions and /v1/chat/completions: OpenAI's generation endpoints, on the
exchange `routes.ExchangeEndpoint` owns (a disconnect cancels the generation; an error
after the first chunk is the stream's last event).

The bodies and chunks come from `openai.py`'s jobs and shapes; this module only runs a
job against the runtime facade and sends what its shape makes.
"""

from __future__ import annotations

from typing import Any, Literal, final

import msgspec

from corral.metrics import Metrics
from corral.runtime import Runtime
from corral.server.openai import Job, chat_job, completion_job, finish_reason
from corral.server.routes import ClientStreams, Exchange, ExchangeEndpoint, fallback_headers

__all__ = ["GenerateEndpoint"]


@final
class GenerateEndpoint(ExchangeEndpoint[Job]):
    """POST /v1/completions or /v1/chat/completions (see `ExchangeEndpoint`)."""

    def __init__(self, runtime: Runtime, metrics: Metrics, kind: Literal["chat", "text"], *,
                 body_timeout_ms: int, clients: ClientStreams) -> None:
        super().__init__(runtime, metrics, "chat.completions" if kind == "chat"
                         else "completions", body_timeout_ms=body_timeout_ms, clients=clients)
        self._make_job = chat_job if kind == "chat" else completion_job

    def job(self, body: Any, request_id: str, client: str) -> Job:
        return self._make_job(body, request_id, client)

    async def answer(self, job: Job, exchange: Exchange) -> None:
        if job.stream:
            await self._stream(job, exchange)
        else:
            await self._whole(job, exchange)

    async def _stream(self, job: Job, exchange: Exchange) -> None:
        """SSE: each choice's chunks as they come (`index` names the choice), each
        choice's finish reason as it ends, then the usage when asked."""
        shape = job.shape
        async with self._runtime.choices(job.params) as choices:
            exchange.stream = choices
            model = choices.model
            async for chunk in choices:
                if not exchange.sse_started:
                    await exchange.start_sse(fallback_headers(choices))
                    for opening in shape.opening(model, job.params.n):
                        await exchange.event(opening)
                event: msgspec.Struct | None
                if chunk.finish_reason is not None:
                    event = shape.ending(model, chunk.choice, finish_reason(chunk.finish_reason))
                else:
                    event = shape.chunk(model, chunk)
                if event is not None:
                    await exchange.event(event)
            exchange.succeeded()
            if job.include_usage:
                await exchange.event(shape.usage(model, choices.usage))
        await exchange.end_sse(done=True)

    async def _whole(self, job: Job, exchange: Exchange) -> None:
        async with self._runtime.choices(job.params) as choices:
            exchange.stream = choices
            body = job.shape.whole(await choices.completion())
        exchange.succeeded()
        await exchange.json(200, body, fallback_headers(choices))
