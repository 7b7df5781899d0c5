"""What crosses between Serve's proxy, the ingress and a replica: one HTTP request, the
parts of its reply, and what the proxy's guard needs to continue a stream whose ingress
was lost.

Data only. The replica runs corral's own HTTP app on the request, so the bytes of the
reply are `corral serve`'s; a part adds what the ingress needs to move a stream to
another replica: which replica sent it, and the token ids behind the text it carries.
The ingress passes those token ids on to the proxy beside the bytes (`DELIVERY_KEY`),
never in them.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

__all__ = ["DELIVERY_KEY", "RESUME_HEADER", "Delivery", "ProxiedRequest", "ReplyPart",
           "ResumeRequest", "ResumeState"]

DELIVERY_KEY: Final = "corral.delivery"
"""The key of a `Delivery` in the ASGI body messages the ingress sends Serve's proxy;
the proxy's guard takes it out before the message reaches the client."""
RESUME_HEADER: Final = b"x-corral-resume"
"""The header (a msgpack `ResumeState`) with which the proxy's guard asks another
ingress to continue a stream whose ingress was lost."""


class ProxiedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One HTTP request as the ingress received it.

    Attributes:
        method, path, query: the request line (`query` without its `?`).
        headers: as received, lowercase names, with the ingress's `x-request-id`.
        body: the whole body.
        client: the client's address, for fair admission and per-client limits.
        affinity: the prefix key the router hashes (None: no preference).
        avoid: ids of replicas this request already lost; the router skips them.
    """

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = []
    body: bytes = b""
    client: tuple[str, int] = ("unknown", 0)
    affinity: str | None = None
    avoid: frozenset[str] = frozenset()


class ResumeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A stream another replica lost, to continue from where its client is.

    Attributes:
        request: the original request (its body says the sampling and the shape).
        prompt: the prompt's token ids, as the first replica built them.
        delivered: token ids whose text the client has received.
    """

    request: ProxiedRequest
    prompt: list[int]
    delivered: list[int]


class ReplyPart(msgspec.Struct, frozen=True, kw_only=True):
    """One piece of a reply.

    `hello` comes first, before any work, so the ingress knows the replica even if it
    dies at once; `start` carries the status and headers; `body` carries bytes.
    `tokens` are the token ids (new since the previous part) whose text the body
    carries; `prompt` (once) the prompt's token ids, and `resumable` whether the
    stream may continue on another replica (greedy or seeded sampling).
    """

    kind: Literal["hello", "start", "body"]
    replica: str
    status: int = 0
    headers: list[tuple[bytes, bytes]] = []
    body: bytes = b""
    tokens: list[int] = []
    prompt: list[int] | None = None
    resumable: bool = False


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """What one body message the ingress sends Serve's proxy carries besides its bytes.

    Attributes:
        tokens: token ids (new since the previous message) whose text the bytes carry.
        prompt: the prompt's token ids, once (None in the other messages).
        resumable: the stream may continue elsewhere (greedy or seeded sampling).
    """

    tokens: list[int] = []
    prompt: list[int] | None = None
    resumable: bool = False


class ResumeState(msgspec.Struct, frozen=True, kw_only=True):
    """A stream to continue after the tokens its client has (`RESUME_HEADER`).

    Attributes:
        prompt: the prompt's token ids, as the first replica built them.
        delivered: token ids whose text the client has received.
    """

    prompt: list[int]
    delivered: list[int]
