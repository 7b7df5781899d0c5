"""One view of the cluster through the ingress: GET /health answered with every
replica's own verdict, GET /metrics with every replica's samples, each labelled
`replica="<id>"`.

A Serve handle reaches one replica per call, so each replica is asked in turn: the
request router leaves out the replicas already asked (`ProxiedRequest.avoid`) while any
other remains, and the first answer from a replica asked before means all were. Each
answer is the replica's own app's (`/health`, `/metrics`); nothing here is computed.
"""

from __future__ import annotations

import uuid
from typing import Any, Final, cast

import msgspec
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.responses import Response

from corral.ray.messages import ProxiedRequest, ReplyPart
from corral.server.bodies import json_response

__all__ = ["VIEW_PATHS", "ask_each_replica", "cluster_view", "merge_metrics"]

VIEW_PATHS: Final = frozenset({"/health", "/metrics"})
_MAX_REPLICAS: Final = 256
_PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4; charset=utf-8"


async def ask_each_replica(replicas: DeploymentHandle[Any], path: str,
                           lost: tuple[type[BaseException], ...]) -> dict[str, tuple[int, bytes]]:
    """GET `path` of every replica the router knows: replica id → (status, body).
    A replica lost while it answers is left out."""
    answers: dict[str, tuple[int, bytes]] = {}
    for _ in range(_MAX_REPLICAS):
        request = ProxiedRequest(method="GET", path=path, avoid=frozenset(answers),
                                 headers=[(b"x-request-id", uuid.uuid4().hex.encode())])
        parts = cast(DeploymentResponseGenerator[ReplyPart],
                     replicas.options(stream=True).exchange.remote(request))
        replica: str | None = None
        status, body = 0, []
        try:
            async for part in parts:
                if part.kind == "hello":
                    replica = part.replica
                    if replica in answers:  # every replica was asked
                        parts.cancel()  # type: ignore[no-untyped-call]
                        return answers
                    continue
                status = status or part.status
                body.append(part.body)
        except lost:
            continue
        if replica is None:
            break
        answers[replica] = (status, b"".join(body))
    return answers


def merge_metrics(texts: dict[str, bytes]) -> bytes:
    """Prometheus texts of several replicas as one: each family once, with every
    replica's samples, each labelled `replica="<id>"`."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in texts.items():
        family = ""
        for line in text.decode().splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                known = headers.setdefault(family, [])
                if line not in known:
                    known.append(line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#"):
                samples.setdefault(family, []).append(_labelled(line, replica))
    lines = [line for family, sampled in samples.items()
             for line in (*headers.get(family, ()), *sampled)]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _labelled(sample: str, replica: str) -> str:
    ends = [i for i in (sample.find("{"), sample.find(" ")) if i >= 0]
    cut = min(ends) if ends else len(sample)
    label = f'replica="{replica}"'
    if sample[cut:cut + 1] == "{":
        rest = sample[cut + 1:]
        return f"{sample[:cut]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:cut]}{{{label}}}{sample[cut:]}"


def _health(answers: dict[str, tuple[int, bytes]]) -> Response:
    """Every replica's /health body; 200 while one can serve. `status` is ok when all
    can, degraded when some can, unavailable when none can (or none answered)."""
    replicas: dict[str, Any] = {}
    for replica, (status, body) in answers.items():
        try:
            replicas[replica] = msgspec.json.decode(body)
        except msgspec.DecodeError:
            replicas[replica] = {"status": "unavailable", "http_status": status}
    ok = [status == 200 for status, _ in answers.values()]
    verdict = "ok" if ok and all(ok) else "degraded" if any(ok) else "unavailable"
    return json_response({"status": verdict, "replicas": replicas},
                         200 if any(ok) else 503)


async def cluster_view(replicas: DeploymentHandle[Any], path: str,
                       lost: tuple[type[BaseException], ...]) -> Response:
    """The ingress's answer to GET `path` (one of `VIEW_PATHS`)."""
    answers = await ask_each_replica(replicas, path, lost)
    if path == "/health":
        return _health(answers)
    return Response(merge_metrics({replica: body for replica, (status, body)
                                   in answers.items() if status == 200}),
                    media_type=_PROMETHEUS_TEXT)
