"""The Ollama API's endpoints as ASGI apps: POST /api/chat and /api/generate (one
exchange per request, streamed as NDJSON unless `stream` is false), GET /api/tags,
POST /api/show, GET /api/ps, GET /api/version, and GET / ("Ollama is running", which
clients probe).

A generation endpoint owns its whole exchange (`exchange.py`, as the OpenAI ones do):
a client that goes away cancels its generation, and an error after the stream has
started is its last line, `{"error": "..."}`. A request naming a model that is not
loaded but loads on demand waits for the load (`Runtime.keep_model`, the runtime's
keep-alive); one with nothing to generate only loads the model, or with `keep_alive` 0
unloads it, as Ollama's do. Bodies are shaped by `ollama.py`; statuses and headers
are every API's (`errors.py`), so a client error is never a 5xx.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from typing import Any, ClassVar, Literal, final

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from corral.metrics import Metrics
from corral.protocol.codec import convert_params
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.messages import GenerateParams
from corral.protocol.ollama import (
    API_VERSION,
    ChatRequest,
    GenerateRequest,
    RunningModels,
    ShowRequest,
    Tags,
    Version,
)
from corral.runtime import Runtime
from corral.server.bodies import error_response, json_response, read_json
from corral.server.errors import ErrorShape
from corral.server.exchange import (
    NDJSON,
    ClientStreams,
    Exchange,
    ExchangeEndpoint,
    Framing,
    fallback_headers,
)
from corral.server.ollama import (
    OLLAMA_ERRORS,
    ModelFiles,
    Reply,
    model_entry,
    running_model,
    show_response,
)

__all__ = ["OllamaGenerateEndpoint", "OllamaJob", "OllamaRoutes", "ollama_routes"]


def _not_found(alias: str) -> EngineClientError:
    return EngineClientError(Code.MODEL_NOT_LOADED, f"model {alias!r} not found",
                             {"model": alias})


def model_files(path: str) -> ModelFiles:
    """What a model's files tell (blocking: run it in a thread): a directory's files
    (and its config.json's `model_type`), or one file (a GGUF); nothing for a path
    that is neither here (a Hugging Face id, `ollama:NAME`)."""
    try:
        if os.path.isfile(path):
            stat = os.stat(path)
            return ModelFiles(stat.st_size, stat.st_mtime, "")
        if not os.path.isdir(path):
            return ModelFiles()
        stats = [entry.stat() for entry in os.scandir(path) if entry.is_file()]
        family = ""
        config = os.path.join(path, "config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as file:
                model_type = json.load(file).get("model_type", "")
            family = model_type if isinstance(model_type, str) else ""
        return ModelFiles(sum(s.st_size for s in stats),
                          max((s.st_mtime for s in stats), default=0.0), family)
    except (OSError, ValueError):
        return ModelFiles()


class OllamaJob(msgspec.Struct, frozen=True):
    """One validated /api/chat or /api/generate request.

    Attributes:
        request: the request as sent.
        params: what the runtime runs; None for a request with nothing to generate,
            which only loads (or with `keep_alive` 0 unloads) its model.
    """

    request: ChatRequest | GenerateRequest
    params: GenerateParams | None


@final
class OllamaGenerateEndpoint(ExchangeEndpoint[OllamaJob]):
    """POST /api/chat or /api/generate (see the module and `ExchangeEndpoint`): NDJSON,
    errors in Ollama's shape."""

    errors: ClassVar[ErrorShape] = OLLAMA_ERRORS
    framing: ClassVar[Framing] = NDJSON

    def __init__(self, runtime: Runtime, metrics: Metrics, kind: Literal["chat", "generate"],
                 *, body_timeout_ms: int, clients: ClientStreams) -> None:
        super().__init__(runtime, metrics, f"api/{kind}", body_timeout_ms=body_timeout_ms,
                         clients=clients)
        self._kind = kind
        self._type: type[ChatRequest | GenerateRequest] = (
            ChatRequest if kind == "chat" else GenerateRequest)

    def job(self, body: Any, request_id: str, client: str) -> OllamaJob:
        request = convert_params(body, self._type)
        has_work = bool(request.messages if isinstance(request, ChatRequest)
                        else request.prompt)
        return OllamaJob(request, request.to_generate_params(request_id, client)
                         if has_work else None)

    async def answer(self, job: OllamaJob, exchange: Exchange) -> None:
        request, params = job.request, job.params
        reply = Reply(self._kind, request.model, exchange.started_at)
        if params is None:
            await self._runtime.keep_model(request.model, request.keep_alive_s())
            await exchange.reply(reply.loaded(request.keep_alive_s() == 0.0,
                                              trio.current_time()))
        elif request.stream:
            await self._stream(params, reply, exchange)
        else:
            await self._whole(params, reply, exchange)

    async def _stream(self, params: GenerateParams, reply: Reply, exchange: Exchange) -> None:
        """NDJSON: a line per chunk with text or tool calls, then the done line."""
        async with self._runtime.choices(params) as choices:
            exchange.stream = choices
            reply.opened(trio.current_time())
            async for chunk in choices:
                if not exchange.streaming:
                    await exchange.start_stream(fallback_headers(choices))
                if chunk.finish_reason is not None:
                    last = reply.last(chunk.finish_reason, choices.usage, trio.current_time())
                    exchange.succeeded()
                    await exchange.event(last)
                    break
                line = reply.line(chunk, trio.current_time())
                if line is not None:
                    await exchange.event(line)
        await exchange.end_stream(done=True)

    async def _whole(self, params: GenerateParams, reply: Reply, exchange: Exchange) -> None:
        async with self._runtime.choices(params) as choices:
            exchange.stream = choices
            reply.opened(trio.current_time())
            async for chunk in choices:
                reply.line(chunk, trio.current_time())  # times the first token
            stream = choices.streams[0]
            body = reply.last(stream.finish_reason, choices.usage, trio.current_time(),
                              stream.text, stream.tool_calls)
        await exchange.reply(body, fallback_headers(choices))


@final
class OllamaRoutes:
    """GET /api/tags, POST /api/show, GET /api/ps, GET /api/version and GET /."""

    def __init__(self, runtime: Runtime, *, body_timeout_ms: int) -> None:
        self._runtime = runtime
        self._body_timeout_ms = body_timeout_ms

    async def _files(self, path: str) -> ModelFiles:
        return await trio.to_thread.run_sync(model_files, path)

    async def tags(self, request: Request) -> Response:
        """Every model: the loaded ones, then those that load on demand."""
        entries = [model_entry(m.alias, m.path, await self._files(
                       m.info.path if m.info else m.path))
                   for m in self._runtime.list_models()]
        entries += [model_entry(c.alias, c.path, await self._files(c.path))
                    for c in self._runtime.loadable_models()]
        return json_response(Tags(entries))

    async def ps(self, request: Request) -> Response:
        """The loaded models, each with when it is unloaded for being idle."""
        now, wall = trio.current_time(), time.time()
        running = []
        for model in self._runtime.list_models():
            expires = self._runtime.model_expires_at(model.alias)
            running.append(running_model(
                model, await self._files(model.info.path if model.info else model.path),
                wall + (expires - now) if expires is not None else None))
        return json_response(RunningModels(running))

    async def show(self, request: Request) -> Response:
        """A loaded model, or one that loads on demand; 404 for any other."""
        try:
            body = await read_json(request, self._runtime.config.server.max_body_bytes,
                                   self._body_timeout_ms)
            alias = convert_params(body, ShowRequest).alias
        except CorralError as error:
            return error_response(error, request.state.request_id, OLLAMA_ERRORS)
        for model in self._runtime.list_models():
            if model.alias == alias:
                path = model.info.path if model.info else model.path
                return json_response(show_response(alias, model, await self._files(path)))
        for config in self._runtime.loadable_models():
            if config.alias == alias:
                return json_response(show_response(alias, None,
                                                   await self._files(config.path)))
        return error_response(_not_found(alias), request.state.request_id, OLLAMA_ERRORS)

    async def version(self, request: Request) -> Response:
        return json_response(Version(API_VERSION, importlib.metadata.version("corral")))

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")


def ollama_routes(runtime: Runtime, metrics: Metrics, *, body_timeout_ms: int,
                  clients: ClientStreams) -> list[Route]:
    """The Ollama API's routes, to add to the app beside the OpenAI ones."""
    routes = OllamaRoutes(runtime, body_timeout_ms=body_timeout_ms)

    def generate(kind: Literal["chat", "generate"]) -> OllamaGenerateEndpoint:
        return OllamaGenerateEndpoint(runtime, metrics, kind, body_timeout_ms=body_timeout_ms,
                                      clients=clients)

    return [Route("/api/chat", generate("chat"), methods=["POST"]),
            Route("/api/generate", generate("generate"), methods=["POST"]),
            Route("/api/tags", routes.tags, methods=["GET"]),
            Route("/api/show", routes.show, methods=["POST"]),
            Route("/api/ps", routes.ps, methods=["GET"]),
            Route("/api/version", routes.version, methods=["GET"]),
            Route("/", routes.root, methods=["GET"])]
