"""What a runtime reports about itself: health, model descriptions, statistics.

Data only, plus the rule that turns the state of the domains and models into a
verdict. Nothing here asks an actor anything or changes state.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from corral.actors.system import ActorSystem
from corral.protocol.messages import ModelInfo, PrefixCacheStatistics
from corral.protocol.serving_messages import RegistryState
from corral.resilience.breaker_types import BreakerStatistics
from corral.resilience.rolling import RollingSnapshot
from corral.runtime.model import EngineProgress

__all__ = ["DomainHealth", "Health", "ModelDescription", "ModelState", "RuntimeStatistics",
           "assess"]

ModelState = Literal["loading", "ready", "restarting", "failed"]

DOMAINS = ("stream_registry", "generation", "transport")


class ModelDescription(msgspec.Struct, frozen=True):
    """A model as `/health` and `list_models` show it; `worker_pid` is the process its
    engine runs in under process isolation (None in thread isolation, or restarting).

    A failed model is reloaded: `reloads` counts the attempts so far, and
    `reload_in_s` is the time until the next one (None while one runs, and unless
    the model failed); `breaker` is "forced_open" while it waits, "half_open" while a
    reload runs. `restarting_s` is how long a restarting model has been restarting.
    """

    alias: str
    path: str
    state: ModelState
    fallbacks: list[str]
    info: ModelInfo | None
    restarts: int
    breaker: str
    worker_pid: int | None = None
    reloads: int = 0
    reload_in_s: float | None = None
    restarting_s: float | None = None


class DomainHealth(msgspec.Struct, frozen=True):
    name: str
    state: str
    restarts: int


class Health(msgspec.Struct, frozen=True):
    """Each failure domain, each model, and whether the runtime can serve.

    `ok` is False when a domain is down or a model has failed for good.
    """

    ok: bool
    domains: list[DomainHealth]
    models: list[ModelDescription]
    active_streams: int
    reasons: list[str]


class ResilienceState(msgspec.Struct, frozen=True):
    """How requests fared lately, and each model's breaker.

    Attributes:
        windows: success and error rates, retries and fallbacks over the last 1, 5
            and 15 minutes (overall and per model), latency p50/p90/p99 per model.
        breakers: each model's breaker: state, transitions, time spent open, counts
            (a breaker whose actor is restarting is left out).
        retries_total: retries since the start, by model.
        fallbacks_total: requests served by a fallback since the start, by requested
            model and then by what served them (an alias, "cached", "default").
    """

    windows: RollingSnapshot
    breakers: dict[str, BreakerStatistics]
    retries_total: dict[str, int]
    fallbacks_total: dict[str, dict[str, int]]


class RuntimeStatistics(msgspec.Struct, frozen=True):
    """Every actor's mailbox statistics, the stream registry's state, each model's
    prefix cache counters (those of its engine now: they restart with the engine), and
    the rolling error metrics with the breakers (`resilience`)."""

    actors: dict[str, Any]
    registry: RegistryState
    prefix_cache: dict[str, PrefixCacheStatistics] = {}
    resilience: ResilienceState | None = None


def assess(system: ActorSystem, models: list[ModelDescription], *, draining: bool,
           progress: dict[str, EngineProgress | None], active_streams: int,
           restart_limit_s: float) -> Health:
    """The runtime's health: not ok while a domain is not running, a model failed or
    has been restarting for longer than `restart_limit_s` (its longest backoff and a
    load), the server drains, or an engine with work made no step for half its step's
    limit (see `EngineProgress`), or stalled and waits for its engine thread to stop."""
    domains = []
    reasons = []
    for name in DOMAINS:
        stats = system.mailbox(f"root/{name}").statistics()
        domains.append(DomainHealth(name, stats.state, stats.restarts))
        if stats.state != "running":
            reasons.append(f"{name} is {stats.state}")
    for model in models:
        if model.state == "failed":
            reasons.append(f"model {model.alias} failed")
            reasons.append(f"model {model.alias} reloads in {model.reload_in_s:.1f}s"
                           if model.reload_in_s is not None
                           else f"model {model.alias} is reloading")
        elif model.restarting_s is not None and model.restarting_s > restart_limit_s:
            reasons.append(f"model {model.alias} has been restarting for "
                           f"{model.restarting_s:.1f}s (limit {restart_limit_s:.1f}s)")
    if draining:
        reasons.append("shutting down")
    for alias, engine in progress.items():
        if engine is not None and engine.stalled:
            reasons.append(f"model {alias} stalled: its engine made no step for "
                           f"{engine.age_s:.1f}s, and it restarts once the engine has "
                           f"stopped")
        elif engine is not None and engine.age_s > engine.limit_s / 2:
            reasons.append(f"model {alias} has work but made no step for "
                           f"{engine.age_s:.1f}s (limit {engine.limit_s:.1f}s)")
    return Health(ok=not reasons, domains=domains, models=models,
                  active_streams=active_streams, reasons=reasons)
