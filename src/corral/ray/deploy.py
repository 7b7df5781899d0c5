"""Deploying corral on Ray Serve: the replica, ingress and retry budget deployments as
one Serve application, the guard in Serve's proxy, and running it on a local Ray or the
cluster at `RAY_ADDRESS`.

Replica placement, restarts of dead replicas, health checks and autoscaling are
Serve's; what runs inside a replica is corral's. This module only configures.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any, Final

import msgspec
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from corral.config import RuntimeConfig
from corral.engine.blas import CpuBlas, worker_environment
from corral.ray.budget import BUDGET_DEPLOYMENT, SharedRetryBudget
from corral.ray.exchange import Coalescing
from corral.ray.front import ATTEMPTS_ENV
from corral.ray.ingress import CorralIngress
from corral.ray.replica import CorralReplica
from corral.server.serve import parse_host_port, parse_model
from corral.tiny import default_model_path

__all__ = ["APP_NAME", "INGRESS_DEPLOYMENT", "REPLICA_DEPLOYMENT", "RayOptions",
           "build_application", "connect", "deploy", "main", "parse_autoscale",
           "serve_forever"]

APP_NAME: Final = "corral"
REPLICA_DEPLOYMENT: Final = "corral-replica"
INGRESS_DEPLOYMENT: Final = "corral-ingress"
ROUTER: Final = "corral.ray.routing.PrefixAffinityRouter"
PROXY_GUARD: Final = "corral.ray.front.proxy_middlewares"


class RayOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How many replicas, and what each may take of a node.

    Attributes:
        replicas: a fixed count (ignored when `autoscale` is set).
        autoscale: (min, max) replicas; Serve scales on ongoing requests per replica,
            and a replica's ongoing requests are its running plus waiting streams,
            targeted at `stream_registry.max_active_streams`.
        replica_cpus: CPUs reserved per replica (MLX takes what it needs; this is
            Ray's bookkeeping, fractional so replicas share a small node).
        ingresses: ingress replicas (Serve's proxy spreads requests over them; a stream
            whose ingress is lost continues through another).
        ingress_cpus: CPUs reserved per ingress replica.
        health_check_period_s: how often Serve asks each replica's `check_health`.
        coalescing: how a replica batches a reply's parts into Ray items.
    """

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    replica_cpus: float = 0.5
    ingresses: int = 2
    ingress_cpus: float = 0.125
    health_check_period_s: float = 2.0
    coalescing: Coalescing = Coalescing()


def build_application(config: RuntimeConfig, models: Mapping[str, str],
                      options: RayOptions = RayOptions()) -> Any:
    """The Serve application: the ingress bound to the replica deployment and to the
    retry budget they share (none when `calls.retry.budget.enabled` is false).

    Serve's graceful shutdown timeout is corral's drain timeout plus a margin, so a
    replica that drains is not killed under it.
    """
    registry = config.stream_registry
    scaling: dict[str, Any] = {}
    if options.autoscale is not None:
        low, high = options.autoscale
        scaling["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high, "initial_replicas": low,
            "target_ongoing_requests": registry.max_active_streams}
    else:
        scaling["num_replicas"] = options.replicas
    replica = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_cpus": options.replica_cpus, "runtime_env": {
            "env_vars": {**_worker_env(), **_blas_env(config.generation.cpu_blas)}}},
        max_ongoing_requests=registry.max_active_streams + registry.max_queued,
        graceful_shutdown_timeout_s=config.server.drain_timeout_ms / 1000.0 + 5.0,
        health_check_period_s=options.health_check_period_s,
        # Ray types this pydantic field wrongly (it takes an import path or a class).
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER),  # type: ignore[arg-type]
        **scaling)(CorralReplica)
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT, num_replicas=options.ingresses,
        ray_actor_options={"num_cpus": options.ingress_cpus},
        max_ongoing_requests=max(1000, registry.max_active_streams + registry.max_queued),
    )(CorralIngress)
    retry = config.calls.retry
    budget = serve.deployment(
        name=BUDGET_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000)(SharedRetryBudget).bind(retry.budget) \
        if retry.budget.enabled else None
    return ingress.bind(replica.bind(config, dict(models), options.coalescing),
                        retry.max_attempts, budget)


_PROXY_READY_CHECK_S: Final = "20"  # seconds, each of Serve's three checks


def _worker_env() -> dict[str, str]:
    """This process's `PYTHONPATH`, absolute: Ray's workers do not start in this
    process's directory."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in path.split(os.pathsep))
            } if path else {}


def _blas_env(cpu_blas: CpuBlas) -> dict[str, str]:
    """What a replica's process needs in its environment for MLX to use the BLAS shim
    (`corral.engine.blas`): a replica serves the thread engine in its own process, which
    Ray starts, so the shim must be preloaded there, as for a worker process. Empty
    where there is no shim or `cpu_blas` is "reference". The shim's path is this
    machine's: a host that lacks it runs the reference BLAS (the loader says so)."""
    env = worker_environment(cpu_blas) or {}
    return {key: env[key] for key in ("LD_PRELOAD", "OPENBLAS_NUM_THREADS") if key in env}


def connect(address: str | None = None, **init: Any) -> None:
    """Join the Ray cluster at `address` (else `RAY_ADDRESS`, else one running on this
    machine), or start a local one; "local" always starts one. `init` goes to
    `ray.init`. The workers see this process's `PYTHONPATH`."""
    if ray.is_initialized():
        return
    env = _worker_env()
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, **init)


def deploy(config: RuntimeConfig, models: Mapping[str, str], host: str, port: int,
           options: RayOptions = RayOptions()) -> Any:
    """Start Serve's HTTP proxy on `host:port`, with corral's guard in it
    (`corral.ray.front`), and run the application; returns the ingress's handle once
    every replica is up (models loaded). Serve applies the proxy's options only when
    it starts Serve on the cluster."""
    env = {**_worker_env(), "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_GUARD,
           ATTEMPTS_ENV: str(config.calls.retry.max_attempts),
           # Serve kills a proxy that misses three readiness checks of 5 s (the first
           # try), and `serve.start` then fails: on a loaded 2-core machine a proxy's
           # start (an interpreter, Serve, corral's guard) took longer than that.
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": _PROXY_READY_CHECK_S}
    serve.start(http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": env}})
    return serve.run(build_application(config, models, options), name=APP_NAME,
                     route_prefix="/")


def serve_forever(config: RuntimeConfig, models: Mapping[str, str], host: str, port: int,
                  options: RayOptions = RayOptions()) -> None:
    """`corral serve --ray`: connect, deploy, and serve until SIGTERM or SIGINT, then
    delete the application (each replica drains) and leave the cluster."""
    connect()
    deploy(config, models, host, port, options)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"corral: serving on Ray at http://{host}:{port}", flush=True)
    stop.wait()
    serve.delete(APP_NAME)
    ray.shutdown()


def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` replicas, 0 <= MIN <= MAX, MAX >= 1.

    Raises:
        ValueError: naming the option and what was given.
    """
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit()) or not 0 <= int(low) <= int(high) \
            or int(high) < 1:
        raise ValueError(f"--autoscale: expected MIN:MAX with 0 <= MIN <= MAX, got {text!r}")
    return int(low), int(high)


def _models(config: RuntimeConfig, specs: tuple[str, ...]) -> dict[str, str]:
    """The command line's models, alias → path (an alias defaults to the path's last
    part, as `corral serve` names it); the tiny model when neither they nor the config
    name one. Each node resolves the paths on its own disk."""
    models = {}
    for spec in specs:
        alias, path = parse_model(spec)
        models[alias or path.rstrip("/").rsplit("/", 1)[-1]] = path
    if not models and not config.generation.models:
        models["tiny"] = str(default_model_path())
    return models


def main(config: RuntimeConfig, models: tuple[str, ...], http: str | None, replicas: int,
         autoscale: str | None) -> int:
    """`corral serve --ray [--replicas N | --autoscale MIN:MAX]`: returns the exit code
    (2 for a bad option, with one line saying which)."""
    try:
        scaling = parse_autoscale(autoscale) if autoscale is not None else None
        host, port = parse_host_port(
            http or f"{config.server.http_host}:{config.server.http_port}")
    except ValueError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 2
    serve_forever(config, _models(config, models), host, port,
                  RayOptions(replicas=replicas, autoscale=scaling))
    return 0
