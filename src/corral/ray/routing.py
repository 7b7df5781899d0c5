"""Prefix-affine routing: requests that share a conversation's opening (its system
prompt and first user turn) or a prompt's first characters go to the replica whose
prefix cache holds it, unless that replica is much busier than the least loaded one.

`affinity_key` is computed once, by the ingress, from the request body;
`PrefixAffinityRouter` is the Serve request router of the replica deployment. It
chooses by rendezvous hashing over the replicas' ids, so adding or losing a replica
moves only the conversations that were on it, and every ingress process agrees
without sharing state. It never reads a body and never blocks.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from corral.protocol.codec import decode_json
from corral.ray.messages import ProxiedRequest, ResumeRequest

__all__ = ["PrefixAffinityRouter", "affinity_key", "preferred_replica"]

PROMPT_PREFIX_CHARS: Final = 256
"""How much of a text prompt decides its replica: a continued prompt keeps them."""
DEFAULT_IMBALANCE: Final = 4
"""How many more ongoing requests than the least loaded replica the preferred one may
hold before a request goes to the least loaded instead."""


def affinity_key(path: str, body: bytes) -> str | None:
    """The prefix a request's replica is chosen by, hashed; None for a request with
    no prompt to speak of (or a body that is not JSON: the replica answers it).

    A chat's key is its model, its leading system messages and its first user turn,
    which every later turn of the conversation resends; a completion's, its model and
    the first `PROMPT_PREFIX_CHARS` characters of its prompt.
    """
    try:
        data = decode_json(body)
    except Exception:  # a bad body is the replica's to answer, with its proper error
        return None
    if not isinstance(data, dict):
        return None
    opening: Any
    if path.endswith("/chat/completions"):
        messages = data.get("messages")
        if not isinstance(messages, list):
            return None
        opening = []
        for message in messages:
            opening.append(message)
            if isinstance(message, dict) and message.get("role") not in ("system", "developer"):
                break
    elif path.endswith("/completions"):
        prompt = data.get("prompt")
        opening = prompt[:PROMPT_PREFIX_CHARS] if isinstance(prompt, str | list) else None
    else:
        return None
    if not opening:
        return None
    return hashlib.blake2b(repr((data.get("model"), opening)).encode(),
                           digest_size=16).hexdigest()


def _score(key: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()


def preferred_replica(key: str, replicas: list[str]) -> str:
    """The replica `key` belongs to among `replicas` (rendezvous hashing)."""
    return max(replicas, key=lambda replica: _score(key, replica))


def _routed(request: Any) -> ProxiedRequest | None:
    if isinstance(request, ResumeRequest):
        return request.request
    return request if isinstance(request, ProxiedRequest) else None


class PrefixAffinityRouter(RequestRouter):
    """Serve's request router for corral replicas.

    Ranks: the preferred replica of the request's affinity key, then the others from
    the least loaded; when the preferred one holds `imbalance` or more ongoing
    requests than the least loaded, the least loaded goes first. A request without a
    key (a resume, a GET) goes to the least loaded. Replicas the request already lost
    (`avoid`) are left out while any other remains.

    Kwargs (`RequestRouterConfig.request_router_kwargs`): `imbalance` (default 4).
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._imbalance = int(kwargs.get("imbalance", DEFAULT_IMBALANCE))

    def _load(self, replica: RunningReplica) -> int:
        known = self.replica_queue_len_cache.get(replica.replica_id)
        return int(known) if known is not None else 0

    async def choose_replicas(
            self, candidate_replicas: list[RunningReplica],
            pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        request = _routed(pending_request.args[0]) if (
            pending_request is not None and pending_request.args) else None
        avoid = request.avoid if request is not None else frozenset()
        candidates = [r for r in candidate_replicas
                      if r.replica_id.unique_id not in avoid] or list(candidate_replicas)
        if not candidates:
            return []
        by_load = sorted(candidates, key=self._load)
        key = request.affinity if request is not None else None
        if key is None:
            return [[replica] for replica in by_load]
        ids = {r.replica_id.unique_id: r for r in candidates}
        preferred = ids[preferred_replica(key, list(ids))]
        rest = [r for r in by_load if r is not preferred]
        if rest and self._load(preferred) >= self._load(rest[0]) + self._imbalance:
            return [[rest[0]], [preferred], *([r] for r in rest[1:])]
        return [[preferred], *([r] for r in rest)]
