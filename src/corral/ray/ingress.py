"""The OpenAI ingress in front of corral replicas: every HTTP request goes, whole, to
one replica, which answers it with corral's own HTTP app; the ingress passes the
reply through, byte for byte, with `X-Corral-Replica` naming who served it.

What the ingress adds is what one replica cannot do for itself:
- the affinity key (`routing.affinity_key`) the request router places the request by;
- a request whose replica is lost before its reply starts, or answers 503, is sent to
  another replica, up to `calls.retry.max_attempts` calls in all;
- a deterministic (greedy or seeded) SSE stream whose replica is lost mid-stream
  continues on another replica after the tokens whose text the client has
  (`GenerateParams.generated`), so its text is the one a fault-free run sends; any
  other stream ends with a retryable TransportError event, as `corral serve` ends a
  stream it cannot finish.

It never shapes a body of its own except those two errors, and keeps no state beyond
the requests in flight.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Final, final

import msgspec
import structlog
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from corral.protocol.errors import Code, EngineClientError
from corral.ray.messages import ProxiedRequest, ReplyPart, ResumeRequest
from corral.ray.routing import affinity_key
from corral.server.bodies import error_response
from corral.server.openai import error_body

__all__ = ["CorralIngress", "ReplicaLostError"]

REPLICA_LOST: Final = (RayActorError, ActorUnavailableError)
"""What a call to a replica raises when the replica died or cannot be reached (the
replica's own errors are replies, never exceptions)."""
_encode = msgspec.json.Encoder().encode
_log = structlog.get_logger("corral.ray")


class ReplicaLostError(Exception):
    """Every attempt lost its replica before the reply started."""


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if 0 < len(given) <= 128 and given.isascii() and given.isprintable() \
        and " " not in given else uuid.uuid4().hex


@final
class _Reply:
    """One request's calls to replicas, until its reply is complete."""

    def __init__(self, replicas: DeploymentHandle[Any], request: ProxiedRequest,
                 request_id: str, attempts: int) -> None:
        self._replicas = replicas
        self._request = request
        self._request_id = request_id
        self._attempts_left = attempts
        self._avoid: set[str] = set()
        self._replica: str | None = None
        self._parts: DeploymentResponseGenerator[ReplyPart] | None = None
        self._delivered: list[int] = []
        self._prompt: list[int] | None = None
        self._resumable = False
        self._finished = False

    def _call(self, method: str, argument: Any) -> None:
        self._attempts_left -= 1
        self._replica = None
        handle = self._replicas.options(stream=True)
        self._parts = getattr(handle, method).remote(argument)

    def _routed(self) -> ProxiedRequest:
        return msgspec.structs.replace(self._request, avoid=frozenset(self._avoid))

    async def _next(self) -> ReplyPart:
        """The next part with content (the replica's hello noted on the way).

        Raises:
            REPLICA_LOST: the replica died or is unreachable; it is avoided from now on.
            StopAsyncIteration: the reply is complete.
        """
        assert self._parts is not None
        while True:
            try:
                part: ReplyPart = await self._parts.__anext__()
            except REPLICA_LOST:
                if self._replica is not None:
                    self._avoid.add(self._replica)
                raise
            if part.kind == "hello":
                self._replica = part.replica
                continue
            self._delivered.extend(part.tokens)
            if part.prompt is not None:
                self._prompt = part.prompt
            self._resumable = self._resumable or part.resumable
            self._finished = self._finished or b'"finish_reason":"' in part.body
            return part

    async def open(self) -> ReplyPart:
        """The reply's first part (status and headers), from the first replica that
        gets that far; a 503 (the replica's model circuit is open, or it drains) is
        asked of another replica while attempts remain.

        Raises:
            ReplicaLostError: every attempt lost its replica first.
        """
        while True:
            self._call("exchange", self._routed())
            try:
                first = await self._next()
            except (*REPLICA_LOST, StopAsyncIteration) as exc:
                _log.warning("ray.replica_lost_before_reply", request_id=self._request_id,
                             replica=self._replica, attempts_left=self._attempts_left,
                             error=type(exc).__name__)
                if self._attempts_left <= 0:
                    raise ReplicaLostError(
                        f"the replicas were lost before replying ({exc!r})") from exc
                continue
            if first.status != 503 or self._attempts_left <= 0 or self._replica is None:
                return first
            # The replica cannot serve (its model's circuit is open, it drains): another
            # may, before anything was sent.
            _log.info("ray.replica_unavailable", request_id=self._request_id,
                      replica=self._replica, attempts_left=self._attempts_left)
            self._avoid.add(self._replica)
            self._close()

    async def body(self, first: ReplyPart) -> AsyncIterator[bytes]:
        """The reply's bytes from `first` on, across a replica lost mid-stream.
        Closed early (the client left), the replica's generation is cancelled."""
        try:
            if first.body:
                yield first.body
            while True:
                try:
                    part = await self._next()
                except StopAsyncIteration:
                    self._parts = None  # complete: nothing to cancel
                    return
                except REPLICA_LOST as exc:
                    if self._finished:  # only the end was lost
                        yield b"data: [DONE]\n\n"
                        return
                    if not (self._resumable and self._prompt is not None
                            and self._attempts_left > 0):
                        yield self._lost_event(exc)
                        return
                    _log.warning("ray.stream_resumed", request_id=self._request_id,
                                 lost=self._replica, delivered=len(self._delivered))
                    self._call("resume", ResumeRequest(
                        request=self._routed(), prompt=self._prompt,
                        delivered=list(self._delivered)))
                    continue
                if part.body:
                    yield part.body
        finally:
            self._close()

    def _close(self) -> None:
        """Cancel the call in progress, if any (its replica stops generating)."""
        if self._parts is not None:
            self._parts.cancel()  # type: ignore[no-untyped-call]
            self._parts = None

    def _lost_event(self, exc: BaseException) -> bytes:
        error = EngineClientError(
            Code.TRANSPORT_ERROR,
            f"replica {self._replica or 'unknown'} was lost mid-stream and the stream "
            f"cannot continue elsewhere ({type(exc).__name__})",
            {"completion_tokens": len(self._delivered)}, retryable=True)
        return b"data: " + _encode(error_body(error, self._request_id)) + b"\n\n"


@final
class CorralIngress:
    """A Serve deployment class: `serve.deployment(CorralIngress).bind(replicas,
    attempts)`, where `replicas` is the bound `CorralReplica` deployment.

    Args:
        replicas: the handle of the replica deployment.
        attempts: calls to replicas one request may make (`calls.retry.max_attempts`).
    """

    def __init__(self, replicas: DeploymentHandle[Any], attempts: int) -> None:
        self._replicas = replicas
        self._attempts = attempts

    async def __call__(self, request: Request) -> Response:
        """Serve one HTTP request through a replica.

        A request whose replicas are all lost before replying gets 502 (TransportError,
        retryable) in corral's error body.
        """
        body = await request.body()
        request_id = _request_id(request)
        headers = [(name, value) for name, value in request.headers.raw
                   if name != b"x-request-id"]
        headers.append((b"x-request-id", request_id.encode()))
        client = (request.client.host, request.client.port) if request.client else ("", 0)
        proxied = ProxiedRequest(
            method=request.method, path=request.url.path,
            query=request.url.query.encode("latin-1"), headers=headers, body=body,
            client=client,
            affinity=affinity_key(request.url.path, body) if request.method == "POST" else None)
        reply = _Reply(self._replicas, proxied, request_id, self._attempts)
        try:
            first = await reply.open()
        except ReplicaLostError as exc:
            return error_response(EngineClientError(
                Code.TRANSPORT_ERROR, str(exc), retryable=True), request_id)
        response = StreamingResponse(reply.body(first), status_code=first.status)
        response.raw_headers = [(name, value) for name, value in first.headers]
        return response
