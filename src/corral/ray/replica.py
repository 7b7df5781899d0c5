"""The Ray Serve replica: one supervised corral runtime, run through `corral.aio` on the
replica's asyncio loop, serving corral's own HTTP app to the ingress.

Serve's hooks map onto corral's: `check_health` raises when the runtime's own health
(`corral.runtime.health.assess`: a domain down, a model failed, an engine with work
and no step) says it cannot serve, so Serve replaces the replica; `__del__`, which
Serve calls at a graceful shutdown after waiting for the ongoing requests, drains the
runtime (what is still open ends with a retryable ServerError) and closes it.

This module holds no HTTP logic of its own and never touches the runtime's actors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import final

from ray import serve
from starlette.types import ASGIApp

import corral.aio
from corral.config import RuntimeConfig
from corral.engine.api import FaultKind
from corral.metrics import Metrics
from corral.ray.exchange import Coalescing, Relay, resume_stream, serve_http
from corral.ray.messages import ProxiedRequest, ReplyPart, ResumeRequest
from corral.runtime import Runtime as TrioRuntime
from corral.server.http import build_app

__all__ = ["CorralReplica", "ReplicaUnhealthy"]


class ReplicaUnhealthy(Exception):
    """What `check_health` raises: the runtime's reasons, for Serve's log."""


@final
class CorralReplica:
    """A Serve deployment class: `serve.deployment(CorralReplica).bind(config, models,
    coalescing)`.

    Args:
        config: the runtime's configuration (the models it lists are loaded).
        models: more models, alias → path.
        coalescing: how a reply's parts are batched into Ray items.
    """

    # Serve (Ray actors) awaits an async constructor; type checkers do not know that.
    async def __init__(  # type: ignore[misc]
            self, config: RuntimeConfig, models: Mapping[str, str],
            coalescing: Coalescing = Coalescing()) -> None:
        self._config = config
        self._coalescing = coalescing
        self._id = serve.get_replica_context().replica_id.unique_id
        self._stack = contextlib.AsyncExitStack()
        self._runtime = await self._stack.enter_async_context(
            corral.aio.open_runtime(config, models=models))
        self._metrics: Metrics | None = None
        self._app: ASGIApp = await self._runtime.run_in_trio(self._build_app)

    async def _build_app(self, runtime: TrioRuntime) -> ASGIApp:
        self._metrics = Metrics(runtime)
        return build_app(runtime, self._metrics)

    async def exchange(self, request: ProxiedRequest) -> AsyncIterator[ReplyPart]:
        """Serve one HTTP request with corral's app; a streaming method. A `hello` part
        comes first. Cancelled (the ingress's client left), the generation stops."""
        yield ReplyPart(kind="hello", replica=self._id)
        relay = Relay(self._coalescing)
        async for part in self._relayed(
                relay, lambda rt: serve_http(rt, self._app, request, relay, self._id)):
            yield part

    async def resume(self, request: ResumeRequest) -> AsyncIterator[ReplyPart]:
        """Continue a deterministic stream another replica lost (`resume_stream`); a streaming
        method, `hello` first."""
        yield ReplyPart(kind="hello", replica=self._id)
        relay = Relay(self._coalescing)
        async for part in self._relayed(
                relay, lambda rt: resume_stream(rt, request, relay, self._id)):
            yield part

    async def _relayed(self, relay: Relay,
                       work: Callable[[TrioRuntime], Awaitable[None]]) -> AsyncIterator[ReplyPart]:
        """Run `work` in the runtime's trio run and yield what it relays until it ends;
        leaving early cancels it, and waits until it has stopped."""

        async def run(runtime: TrioRuntime) -> None:
            await work(runtime)

        task = asyncio.ensure_future(self._runtime.run_in_trio(run))
        task.add_done_callback(lambda _: relay.close())
        try:
            async for part in relay.parts():
                yield part
            await task  # re-raises a failure of the work itself
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))

    async def check_health(self) -> None:
        """Raises ReplicaUnhealthy, with the runtime's reasons, when it cannot serve.

        A runtime that drains is not ok by its own rule, and that is right here too: it
        is leaving.
        """
        health = await self._runtime.health()
        if not health.ok:
            raise ReplicaUnhealthy("; ".join(health.reasons))

    async def inject_fault(self, model: str, kind: FaultKind) -> str:
        """The runtime's test hook (`Runtime.inject_fault`), reached through Serve;
        returns this replica's id, since Serve chose the replica."""
        await self._runtime.inject_fault(model, kind)
        return self._id

    async def __del__(self) -> None:
        """Serve's graceful shutdown: drain, then close the runtime. Streams still open
        after `server.drain_timeout_ms` end with a retryable ServerError."""
        timeout = self._config.server.drain_timeout_ms / 1000.0
        try:
            await self._runtime.drain(timeout)
        finally:
            if self._metrics is not None:
                self._metrics.close()
            await self._stack.aclose()
