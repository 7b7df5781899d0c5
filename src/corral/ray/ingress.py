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
  stream it cannot finish;
- a request sent again before its reply started draws on one retry budget shared by
  every ingress replica (`corral.ray.budget`);
- beside each body it sends Serve's proxy the token ids behind it (`Delivery`), so that
  the proxy's guard (`corral.ray.front`) can ask another ingress to continue a stream
  whose ingress was lost (`RESUME_HEADER`);
- GET /health and /metrics answer for every replica (`corral.ray.view`).

It never shapes a body of its own except those errors, and keeps no state beyond the
requests in flight.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final, final

import msgspec
import structlog
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from corral.protocol.errors import Code, EngineClientError
from corral.ray.budget import BudgetClient
from corral.ray.messages import (
    DELIVERY_KEY,
    RESUME_HEADER,
    Delivery,
    ProxiedRequest,
    ReplyPart,
    ResumeRequest,
    ResumeState,
)
from corral.ray.routing import affinity_key
from corral.ray.view import VIEW_PATHS, cluster_view
from corral.server.bodies import error_response
from corral.server.openai import error_body

__all__ = ["INGRESS_HEADER", "CorralIngress", "ReplicaLostError", "lost_event",
           "pinned_request_id"]

INGRESS_HEADER: Final = b"x-corral-ingress"
"""Names the ingress replica that relayed a reply (`x-corral-replica` the replica)."""
REPLICA_LOST: Final = (RayActorError, ActorUnavailableError)
"""What a call to a replica raises when the replica died or cannot be reached (the
replica's own errors are replies, never exceptions)."""
_encode = msgspec.json.Encoder().encode
_decode_resume = msgspec.msgpack.Decoder(ResumeState).decode
_log = structlog.get_logger("corral.ray")


class ReplicaLostError(Exception):
    """Every attempt lost its replica before the reply started."""


def pinned_request_id(given: str | None) -> str:
    """The client's `x-request-id` when it is a usable one (1 to 128 printable ASCII
    characters, no space), else a new one."""
    return given if given is not None and 0 < len(given) <= 128 and given.isascii() \
        and given.isprintable() and " " not in given else uuid.uuid4().hex


@final
class _Reply:
    """One request's calls to replicas, until its reply is complete."""

    def __init__(self, replicas: DeploymentHandle[Any], request: ProxiedRequest,
                 request_id: str, attempts: int, budget: BudgetClient,
                 resumed: ResumeState | None = None) -> None:
        self._replicas = replicas
        self._request = request
        self._request_id = request_id
        self._attempts_left = attempts
        self._budget = budget
        self._avoid: set[str] = set()
        self._replica: str | None = None
        self._parts: DeploymentResponseGenerator[ReplyPart] | None = None
        self._resumed = resumed is not None
        self._delivered: list[int] = list(resumed.delivered) if resumed else []
        self._prompt: list[int] | None = list(resumed.prompt) if resumed else None
        self._resumable = self._resumed
        self._finished = False

    def _call(self, method: str, argument: Any) -> None:
        self._attempts_left -= 1
        self._replica = None
        handle = self._replicas.options(stream=True)
        self._parts = getattr(handle, method).remote(argument)

    def _routed(self) -> ProxiedRequest:
        return msgspec.structs.replace(self._request, avoid=frozenset(self._avoid))

    def _call_resume(self) -> None:
        assert self._prompt is not None
        self._call("resume", ResumeRequest(request=self._routed(), prompt=self._prompt,
                                           delivered=list(self._delivered)))

    async def _may_retry(self) -> bool:
        """An attempt is left and the shared budget allows another (the failed one is
        charged to it). Only a request sent again before its reply started asks: that is
        the retry that multiplies load in an outage. A resume continues a stream already
        admitted, at most once per lost replica, so the attempts alone bound it."""
        return self._attempts_left > 0 and await self._budget.request_retry()

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
        """The reply's first part (status and headers; for a resumed stream, its first
        events), from the first replica that gets that far; a 503 (the replica's model
        circuit is open, or it drains) is asked of another replica while attempts and
        the budget allow.

        Raises:
            ReplicaLostError: every attempt lost its replica first.
        """
        while True:
            if self._resumed:
                self._call_resume()
            else:
                self._call("exchange", self._routed())
            try:
                first = await self._next()
            except (*REPLICA_LOST, StopAsyncIteration) as exc:
                _log.warning("ray.replica_lost_before_reply", request_id=self._request_id,
                             replica=self._replica, attempts_left=self._attempts_left,
                             error=type(exc).__name__)
                if not await self._may_retry():
                    raise ReplicaLostError(
                        f"the replicas were lost before replying ({exc!r})") from exc
                continue
            if first.status != 503 or self._replica is None or not await self._may_retry():
                return first
            # The replica cannot serve (its model's circuit is open, it drains): another
            # may, before anything was sent.
            _log.info("ray.replica_unavailable", request_id=self._request_id,
                      replica=self._replica, attempts_left=self._attempts_left)
            self._avoid.add(self._replica)
            self._close()

    async def body(self, first: ReplyPart) -> AsyncIterator[tuple[bytes, Delivery | None]]:
        """The reply's bytes from `first` on, across a replica lost mid-stream, each
        with the tokens behind it. Closed early (the client left), the replica's
        generation is cancelled."""
        try:
            if first.body:
                yield first.body, _delivery(first)
            while True:
                try:
                    part = await self._next()
                except StopAsyncIteration:
                    self._parts = None  # complete: nothing to cancel
                    self._budget.record_success()
                    return
                except REPLICA_LOST as exc:
                    if self._finished:  # only the end was lost
                        yield b"data: [DONE]\n\n", None
                        return
                    if not (self._resumable and self._prompt is not None
                            and self._attempts_left > 0):
                        yield lost_event(self._request_id, self._replica,
                                         type(exc).__name__, len(self._delivered)), None
                        return
                    _log.warning("ray.stream_resumed", request_id=self._request_id,
                                 lost=self._replica, delivered=len(self._delivered))
                    self._call_resume()
                    continue
                if part.body:
                    yield part.body, _delivery(part)
        finally:
            self._close()

    def _close(self) -> None:
        """Cancel the call in progress, if any (its replica stops generating)."""
        if self._parts is not None:
            self._parts.cancel()  # type: ignore[no-untyped-call]
            self._parts = None


def _delivery(part: ReplyPart) -> Delivery | None:
    if not (part.tokens or part.prompt is not None or part.resumable):
        return None
    return Delivery(tokens=part.tokens, prompt=part.prompt, resumable=part.resumable)


def lost_event(request_id: str, lost: str | None, cause: str, delivered: int) -> bytes:
    """The SSE event that ends a stream whose server (`lost`: a replica's or an
    ingress's id) was lost mid-stream and that cannot continue elsewhere: a retryable
    TransportError, with the tokens the client has as `completion_tokens`."""
    error = EngineClientError(
        Code.TRANSPORT_ERROR,
        f"{lost or 'the server'} was lost mid-stream and the stream cannot continue "
        f"elsewhere ({cause})", {"completion_tokens": delivered}, retryable=True)
    return b"data: " + _encode(error_body(error, request_id)) + b"\n\n"


@final
class _RelayedResponse(Response):
    """The reply as Serve's ASGI messages, each body with its `Delivery` (under
    `DELIVERY_KEY`) for the proxy's guard; a client ignores the key, as does uvicorn."""

    def __init__(self, reply: _Reply, first: ReplyPart, ingress: str) -> None:
        self._reply = reply
        self._first = first
        self.status_code = first.status or 200
        self.raw_headers = [*first.headers, (INGRESS_HEADER, ingress.encode())]
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for body, delivery in self._reply.body(self._first):
            message: dict[str, Any] = {"type": "http.response.body", "body": body,
                                       "more_body": True}
            if delivery is not None:
                message[DELIVERY_KEY] = delivery
            await send(message)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@final
class CorralIngress:
    """A Serve deployment class: `serve.deployment(CorralIngress).bind(replicas,
    attempts, budget)`, where `replicas` is the bound `CorralReplica` deployment and
    `budget` the bound `SharedRetryBudget` (or None).

    Args:
        replicas: the handle of the replica deployment.
        attempts: calls to replicas one request may make (`calls.retry.max_attempts`).
        budget: the handle of the retry budget every ingress shares; None: none.
    """

    def __init__(self, replicas: DeploymentHandle[Any], attempts: int,
                 budget: DeploymentHandle[Any] | None = None) -> None:
        self._replicas = replicas
        self._attempts = attempts
        self._budget = BudgetClient(budget)
        self._id = serve.get_replica_context().replica_id.unique_id

    async def __call__(self, request: Request) -> Response:
        """Serve one HTTP request through a replica; GET /health and /metrics through
        all of them.

        A request whose replicas are all lost before replying gets 502 (TransportError,
        retryable) in corral's error body; a `RESUME_HEADER` that does not decode, 400.
        """
        if request.method == "GET" and request.url.path in VIEW_PATHS:
            return await cluster_view(self._replicas, request.url.path, REPLICA_LOST)
        body = await request.body()
        request_id = pinned_request_id(request.headers.get("x-request-id"))
        resumed: ResumeState | None = None
        given = request.headers.get(RESUME_HEADER.decode())
        if given is not None:
            try:
                resumed = _decode_resume(base64.b64decode(given))
            except (ValueError, msgspec.DecodeError) as exc:
                return error_response(EngineClientError(
                    Code.INVALID_REQUEST, f"{RESUME_HEADER.decode()}: {exc}"), request_id)
        headers = [(name, value) for name, value in request.headers.raw
                   if name not in (b"x-request-id", RESUME_HEADER)]
        headers.append((b"x-request-id", request_id.encode()))
        client = (request.client.host, request.client.port) if request.client else ("", 0)
        proxied = ProxiedRequest(
            method=request.method, path=request.url.path,
            query=request.url.query.encode("latin-1"), headers=headers, body=body,
            client=client,
            affinity=affinity_key(request.url.path, body) if request.method == "POST" else None)
        reply = _Reply(self._replicas, proxied, request_id, self._attempts, self._budget,
                       resumed)
        try:
            first = await reply.open()
        except ReplicaLostError as exc:
            return error_response(EngineClientError(
                Code.TRANSPORT_ERROR, str(exc), retryable=True), request_id)
        return _RelayedResponse(reply, first, self._id)
