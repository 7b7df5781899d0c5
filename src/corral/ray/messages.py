"""What crosses between the ingress and a replica: one HTTP request, and the parts of
its reply.

Data only. The replica runs corral's own HTTP app on the request, so the bytes of the
reply are `corral serve`'s; a part adds what the ingress needs to move a stream to
another replica: which replica sent it, and the token ids behind the text it carries.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["ProxiedRequest", "ReplyPart", "ResumeRequest"]


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
