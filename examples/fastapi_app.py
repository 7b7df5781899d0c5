"""A FastAPI app that embeds corral: `corral.aio` runs the runtime on FastAPI's own loop.

    pip install fastapi uvicorn        # or hypercorn, which corral already depends on
    uvicorn examples.fastapi_app:app   # or: hypercorn examples.fastapi_app:app
    curl -N localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "The quick brown fox", "max_tokens": 32}'

`POST /generate` streams server-sent events: one `data:` event per chunk (its text,
token ids and index), then one with `finish_reason` and `usage`, then `data: [DONE]`.
An error before the first chunk is an HTTP error with corral's status for its code
(404 ModelNotLoaded, 400 InvalidParams, 429 Overloaded with Retry-After, ...); one
during the stream is an `event: error` carrying the same body. A client that
disconnects cancels its generation, which leaves the batch at the next engine step.
`POST /complete` answers with the whole completion, `GET /health` with the runtime's.

The model is `$CORRAL_MODEL` (a local mlx_lm directory), or corral's offline tiny model.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

import corral
from corral import aio
from corral.tiny import default_model_path


class GenerateBody(BaseModel):
    """The request: corral validates the values and names a bad field in its 400."""

    prompt: str | list[int]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None

    def params(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"model", "prompt"})


def _error_body(error: corral.CorralError) -> bytes:
    return msgspec.json.encode({"error": error.info()})


def _error_response(error: corral.CorralError) -> Response:
    headers = {}
    retry_after_ms = error.details.get("retry_after_ms")
    if isinstance(retry_after_ms, int | float):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))
    return Response(_error_body(error), status_code=error.spec.http, headers=headers,
                    media_type="application/json")


async def _events(stream: aio.TokenStream,
                  stack: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    """The SSE body. It owns the open stream: leaving it, by the end, an error or the
    client's disconnect (a cancellation), closes the stream."""
    async with stack:
        try:
            async for chunk in stream:
                yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
        except corral.CorralError as error:
            yield b"event: error\ndata: " + _error_body(error) + b"\n\n"
            return
        end = {"finish_reason": stream.finish_reason, "usage": stream.usage}
        yield b"data: " + msgspec.json.encode(end) + b"\n\n"
        yield b"data: [DONE]\n\n"


def create_app(config: corral.RuntimeConfig | None = None,
               models: Mapping[str, str] | None = None) -> FastAPI:
    """The app; `config` and `models` (alias → path) go to `corral.aio.open_runtime`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = models or {"tiny": os.environ.get("CORRAL_MODEL")
                            or str(default_model_path())}
        async with aio.open_runtime(config, models=served) as runtime:
            app.state.corral = runtime
            yield

    app = FastAPI(title="corral on FastAPI", lifespan=lifespan)

    @app.exception_handler(corral.CorralError)
    async def corral_error(request: Request, error: corral.CorralError) -> Response:
        return _error_response(error)

    @app.post("/generate")
    async def generate(body: GenerateBody, request: Request) -> StreamingResponse:
        runtime: aio.Runtime = request.app.state.corral
        stack = contextlib.AsyncExitStack()
        # Opened here, so that a refusal (Overloaded, ModelNotLoaded...) is an HTTP
        # status rather than an error event in a 200 response.
        stream = await stack.enter_async_context(
            runtime.generate(body.model, body.prompt, **body.params()))
        return StreamingResponse(_events(stream, stack), media_type="text/event-stream")

    @app.post("/complete")
    async def complete(body: GenerateBody, request: Request) -> Response:
        runtime: aio.Runtime = request.app.state.corral
        completion = await runtime.complete(body.model, body.prompt, **body.params())
        return Response(msgspec.json.encode(completion), media_type="application/json")

    @app.get("/health")
    async def health(request: Request) -> Response:
        runtime: aio.Runtime = request.app.state.corral
        report = await runtime.health()
        return Response(msgspec.json.encode(report), status_code=200 if report.ok else 503,
                        media_type="application/json")

    return app


app = create_app()
