"""One HTTP exchange inside a replica, on the trio side: corral's own HTTP app run on a
proxied request, or a lost stream continued; and the relay that hands the reply's parts
to the asyncio side.

The app is `corral.server.http.build_app`, unchanged: routes, errors and SSE shapes are
`corral serve`'s by construction. What this module adds is the token ids behind the
text of each part, read from the runtime's stream table, so that the ingress can move a
deterministic stream to another replica with prompt + tokens already sent.

Sends never checkpoint (they merge into the relay's one waiting part), and each part
carries its text with the tokens behind it: a replica that dies never leaves the client
with text whose tokens were not counted, or the reverse. The relay batches what waits
into few Ray items (`Coalescing`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final, final

import msgspec
import trio
from starlette.types import ASGIApp, Message

from corral.protocol.codec import decode_json
from corral.protocol.errors import Code, CorralError, EngineClientError
from corral.protocol.messages import Usage
from corral.ray.messages import ProxiedRequest, ReplyPart, ResumeRequest
from corral.runtime import Runtime
from corral.runtime.stream_buffers import StreamBuffer
from corral.server.openai import (
    chat_job,
    completion_job,
    error_body,
    explained,
    finish_reason,
)

__all__ = ["REPLICA_HEADER", "Coalescing", "Relay", "resume_stream", "serve_http"]

REPLICA_HEADER: Final = b"x-corral-replica"
_encode = msgspec.json.Encoder().encode


def _merge(waiting: ReplyPart, part: ReplyPart) -> ReplyPart:
    """Two parts as one: the first's kind, status and headers, both bodies and tokens."""
    return msgspec.structs.replace(
        waiting, body=waiting.body + part.body, tokens=[*waiting.tokens, *part.tokens],
        prompt=waiting.prompt if waiting.prompt is not None else part.prompt,
        resumable=waiting.resumable or part.resumable)


class Coalescing(msgspec.Struct, frozen=True, kw_only=True):
    """How a replica batches a reply's parts into Ray items (`Relay`).

    Each item crosses Ray's streaming calls twice (replica → ingress → proxy), at a cost
    per item of the order of a small model's step, so a replica sends what it has at most
    every `interval_ms`, or at once when `max_tokens` token ids wait; the first part and
    the last go at once. On a model whose step is slower than `interval_ms`, every token
    goes at once: the batching only ever merges tokens that wait.

    Attributes:
        interval_ms: the least time between two items of one reply (0: no batching).
        max_tokens: token ids that go at once, whatever the time.
    """

    interval_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 20.0
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 32


@final
class Relay:
    """Parts from the trio side to one asyncio reader, on the loop's one thread.

    `push` never blocks or checkpoints: it merges into the one part that waits, so the
    relay holds at most one part whatever the reader's pace (its bytes bounded by the
    reply, a stream's by its max_tokens). The reader gets that part as `Coalescing`
    says.
    """

    def __init__(self, coalescing: Coalescing = Coalescing()) -> None:
        self._waiting: ReplyPart | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._interval = coalescing.interval_ms / 1000.0
        self._max_tokens = coalescing.max_tokens

    def push(self, part: ReplyPart) -> None:
        self._waiting = part if self._waiting is None else _merge(self._waiting, part)
        self._ready.set()

    def close(self) -> None:
        """No more parts: the reader gets what waits, then the end."""
        self._closed = True
        self._ready.set()

    async def parts(self) -> AsyncIterator[ReplyPart]:
        """Everything pushed, merged, until `close`."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            waiting = self._waiting
            if waiting is not None:
                wait = due - loop.time()
                if wait > 0 and not self._closed and len(waiting.tokens) < self._max_tokens:
                    self._ready.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._ready.wait()
                    continue
                self._waiting = None
                due = loop.time() + self._interval
                yield waiting
                continue
            if self._closed:
                return
            self._ready.clear()
            await self._ready.wait()


def _request_id(request: ProxiedRequest) -> str:
    for name, value in request.headers:
        if name == b"x-request-id":
            return value.decode("latin-1")
    raise ValueError("a proxied request carries the ingress's x-request-id")


@final
class _TokenTap:
    """The token ids behind the text sent so far, from the stream of one request id."""

    def __init__(self, runtime: Runtime, request_id: str) -> None:
        self._runtime = runtime
        self._request_id = request_id
        self._buffer: StreamBuffer | None = None
        self._counted = 0

    def _find(self) -> StreamBuffer | None:
        if self._buffer is None:
            mine = [b for b in self._runtime.stream_buffers()
                    if not b.ended and b.request_id == self._request_id]
            self._buffer = max(mine, key=lambda b: b.stream_id) if mine else None
        return self._buffer

    def advance(self) -> dict[str, Any]:
        """What a part sent now carries: the tokens read since the last part (the app
        sends a chunk's event before its next read), and the prompt the first time."""
        buffer = self._find()
        if buffer is None or buffer.sequence is None:
            return {}
        tokens = buffer.tokens[self._counted:]
        first = self._counted == 0 and bool(tokens)
        self._counted = len(buffer.tokens)
        sampling = buffer.sequence.sampling
        # Another replica continues after the delivered tokens as a worker restart does
        # (`GenerateParams.generated`): identical for greedy or seeded sampling.
        resumable = sampling.deterministic
        return {"tokens": tokens, "resumable": resumable,
                "prompt": list(buffer.sequence.prompt) if first else None}


def _scope(request: ProxiedRequest) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path,
            "raw_path": request.path.encode(), "query_string": request.query,
            "root_path": "", "headers": list(request.headers),
            "client": request.client, "server": ("127.0.0.1", 0), "state": {}}


async def serve_http(runtime: Runtime, app: ASGIApp, request: ProxiedRequest, relay: Relay,
                     replica: str) -> None:
    """Run `request` through `app` (corral's HTTP app over `runtime`), its reply into
    `relay`, each part tagged with `replica` and the tokens behind its text.

    Cancelled, the app sees its client gone: the generation leaves the batch at the
    next engine step. Errors are the app's replies; this raises only on a bug.
    """
    tap = _TokenTap(runtime, _request_id(request))
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await trio.sleep_forever()  # the client leaves by cancelling this exchange

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            relay.push(ReplyPart(
                kind="start", replica=replica, status=message["status"],
                headers=[*message.get("headers", ()), (REPLICA_HEADER, replica.encode())]))
        elif message["type"] == "http.response.body":
            relay.push(ReplyPart(kind="body", replica=replica,
                                 body=bytes(message.get("body", b"")), **tap.advance()))

    await app(_scope(request), receive, send)


async def resume_stream(runtime: Runtime, resume: ResumeRequest, relay: Relay,
                        replica: str) -> None:
    """Continue a deterministic SSE stream another replica lost, as a worker restart
    continues one: the prompt with the delivered tokens as `generated`, so the engine
    picks up where it stopped (text, a seeded sampler's draws, penalties, a grammar);
    the events shaped as the first replica's were (same response id), then the closing
    events and `[DONE]`; no opening, the client has it.

    An error is the stream's last event, as `corral serve` sends it. Cancelled, the
    generation leaves the batch at the next engine step.
    """
    original = resume.request
    request_id = _request_id(original)
    make_job = chat_job if original.path.endswith("/chat/completions") else completion_job

    def event(data: msgspec.Struct, tokens: list[int] | None = None) -> None:
        relay.push(ReplyPart(kind="body", replica=replica, tokens=tokens or [],
                             body=b"data: " + _encode(data) + b"\n\n"))

    try:
        job = make_job(decode_json(original.body), request_id, f"http:{original.client[0]}")
        if job.params.tools:  # the calls read so far were read on the replica that died
            raise EngineClientError(Code.TRANSPORT_ERROR, "the replica serving this stream "
                                    "was lost; a stream with tools cannot continue on another",
                                    retryable=True)
        prompt, delivered = resume.prompt, resume.delivered
        limit = job.params.max_tokens
        model = job.params.model or ""
        reason: str = "length"
        usage = Usage(len(prompt), len(delivered))
        if limit is None or limit > len(delivered):
            params = msgspec.structs.replace(job.params, prompt=prompt, messages=None,
                                             generated=delivered)
            async with runtime.stream(params) as stream:
                async for chunk in stream:
                    shaped = job.shape.chunk(stream.model, chunk)
                    if shaped is not None:
                        event(shaped, chunk.token_ids)
                model, reason = stream.model, finish_reason(stream.finish_reason)
                usage = Usage(len(prompt), len(delivered) + len(stream.token_ids),
                              stream.usage.cached_tokens)
        event(job.shape.ending(model, 0, reason))
        if job.include_usage:
            event(job.shape.usage(model, usage))
        relay.push(ReplyPart(kind="body", replica=replica, body=b"data: [DONE]\n\n"))
    except CorralError as exc:
        event(error_body(explained(exc), request_id))
