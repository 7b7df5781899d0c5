"""POST /v1/completions and /v1/chat/completions: OpenAI's generation endpoints, on the
shared exchange (`exchange.ExchangeEndpoint`: a disconnect cancels the generation; an
error after the first chunk is the stream's last event).

Jobs, shapes and errors are `openai.py`'s; this module only runs a job against the
runtime facade and sends its reply, whole or as SSE chunks ending with `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any, Literal, final

import msgspec
from starlette.routing import Route

from corral.metrics import Metrics
from corral.protocol.errors import CorralError
from corral.runtime import Runtime
from corral.runtime.stream_buffers import StreamChunk
from corral.server.exchange import ClientStreams, Exchange, ExchangeEndpoint, fallback_headers
from corral.server.openai import Job, chat_job, completion_job, explained, finish_reason

__all__ = ["GenerateEndpoint", "openai_routes"]


@final
class GenerateEndpoint(ExchangeEndpoint[Job]):
    """POST /v1/completions ("text") or /v1/chat/completions ("chat"); see
    `ExchangeEndpoint`."""

    def __init__(self, runtime: Runtime, metrics: Metrics, kind: Literal["chat", "text"], *,
                 body_timeout_ms: int, clients: ClientStreams) -> None:
        super().__init__(runtime, metrics, "chat.completions" if kind == "chat"
                         else "completions", body_timeout_ms=body_timeout_ms, clients=clients)
        self._make_job = chat_job if kind == "chat" else completion_job

    def job(self, body: Any, request_id: str, client: str) -> Job:
        """Raises the client's error, saying what is supported for a field accepted
        with its neutral value only."""
        try:
            return self._make_job(body, request_id, client)
        except CorralError as exc:
            raise explained(exc) from None

    async def answer(self, job: Job, exchange: Exchange) -> None:
        if job.stream:
            await self._stream(job, exchange)
        else:
            await self._whole(job, exchange)

    async def _stream(self, job: Job, exchange: Exchange) -> None:
        """SSE: each choice's chunks as they come (`index` names the choice; an echoed
        prompt first), each choice's finish reason as it ends, then the usage when
        asked."""
        shape = job.shape
        echoes = await self._echoes(job)
        async with self._runtime.choices(job.prompts) as choices:
            exchange.stream = choices
            model = choices.model
            async for chunk in choices:
                if not exchange.streaming:
                    await exchange.start_stream(fallback_headers(choices))
                    for opening in shape.opening(model, len(choices.streams)):
                        await exchange.event(opening)
                    for index, echo in enumerate(echoes):
                        echoed = shape.chunk(model, StreamChunk(echo, [], None, 0, choice=index))
                        if echoed is not None:
                            await exchange.event(echoed)
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
        await exchange.end_stream(done=True)

    async def _whole(self, job: Job, exchange: Exchange) -> None:
        echoes = await self._echoes(job)
        completion, headers = await self.complete(job.prompts, exchange)
        if echoes:
            completion = msgspec.structs.replace(completion, choices=[
                msgspec.structs.replace(choice, text=echo + choice.text)
                for choice, echo in zip(completion.choices, echoes, strict=True)])
        await exchange.reply(job.shape.whole(completion), headers)

    async def _echoes(self, job: Job) -> list[str]:
        """With `echo`, each choice's prompt as text (token ids decoded by the model's
        tokenizer); else none."""
        if not job.echo:
            return []
        texts = []
        for params in job.prompts:
            prompt = params.prompt
            assert prompt is not None  # a completion has one
            text = (prompt if isinstance(prompt, str)
                    else await self._runtime.detokenize(params.model, prompt))
            texts += [text] * params.n
        return texts


def openai_routes(runtime: Runtime, metrics: Metrics, *, body_timeout_ms: int,
                  clients: ClientStreams) -> list[Route]:
    """The two endpoints' routes, for the app's route table."""
    def endpoint(kind: Literal["chat", "text"]) -> GenerateEndpoint:
        return GenerateEndpoint(runtime, metrics, kind, body_timeout_ms=body_timeout_ms,
                                clients=clients)

    return [Route("/v1/completions", endpoint("text"), methods=["POST"]),
            Route("/v1/chat/completions", endpoint("chat"), methods=["POST"])]
