"""The OpenAI API's generation endpoints, POST /v1/completions and
/v1/chat/completions: an `Api` of the shared `GenerateEndpoint` (`routes.py`), which owns
the exchange. Jobs, shapes and errors are `openai.py`'s; this module only runs a job and
sends its reply, whole or as SSE chunks ending with `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any, Final, Literal, final

import msgspec

from corral.runtime import Runtime
from corral.server.openai import OPENAI_ERRORS, Job, chat_job, completion_job, finish_reason
from corral.server.routes import Exchange, fallback_headers

__all__ = ["OpenAIApi"]


@final
class OpenAIApi:
    """The OpenAI API's completions ("text") or chat completions ("chat"), as an `Api`."""

    errors: Final = OPENAI_ERRORS

    def __init__(self, kind: Literal["chat", "text"]) -> None:
        self._make_job = chat_job if kind == "chat" else completion_job
        self.method: Final = "chat.completions" if kind == "chat" else "completions"

    def job(self, body: Any, request_id: str, client: str) -> Job:
        return self._make_job(body, request_id, client)

    async def reply(self, runtime: Runtime, job: Job, exchange: Exchange) -> None:
        if job.stream:
            await self._stream(runtime, job, exchange)
        else:
            await self._whole(runtime, job, exchange)

    @staticmethod
    async def _stream(runtime: Runtime, job: Job, exchange: Exchange) -> None:
        """SSE: each choice's chunks as they come (`index` names the choice), each
        choice's finish reason as it ends, then the usage when asked."""
        shape = job.shape
        async with runtime.choices(job.params) as choices:
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

    @staticmethod
    async def _whole(runtime: Runtime, job: Job, exchange: Exchange) -> None:
        async with runtime.choices(job.params) as choices:
            exchange.stream = choices
            body = job.shape.whole(await choices.completion())
        exchange.succeeded()
        await exchange.json(200, body, fallback_headers(choices))
