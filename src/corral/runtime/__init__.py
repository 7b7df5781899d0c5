"""The embedded runtime: `async with open_runtime(config) as rt`.

`Runtime` is a thin facade over the parts of this package, each with one job:
`tree` (the supervision tree), `models` (the loaded models and their subtrees),
`healing` (reloading models that failed for good), `keep_alive` (unloading idle models,
loading them again on demand), `requests` (the request pipeline
and `TokenStream`), `choices` (the `n` choices of one request), `limits` (prompt and
completion lengths) and `health` (what the runtime reports). `open_runtime` builds
them once, in dependency order (`_assemble`); the facade (`facade.py`) keeps them
private and holds no state of its own. Other modules use its methods, never its parts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import structlog

from corral.actors.child_spec import ChildSpec
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem
from corral.config import RuntimeConfig
from corral.logging import configure_logging
from corral.runtime.choices import ChoiceStreams
from corral.runtime.facade import Runtime
from corral.runtime.healing import Healer, Reloader
from corral.runtime.health import (
    DomainHealth,
    Health,
    ModelDescription,
    ModelState,
    ResilienceState,
    RuntimeStatistics,
)
from corral.runtime.keep_alive import IdleUnloader, KeepAlive
from corral.runtime.models import Models
from corral.runtime.requests import Requests, TokenStream, shutting_down_error
from corral.runtime.stream_buffers import StreamTable
from corral.runtime.tree import RunningRoot, build_root

__all__ = ["ChoiceStreams", "DomainHealth", "Health", "ModelDescription", "ModelState",
           "ResilienceState", "Runtime", "RuntimeStatistics", "TokenStream", "open_runtime",
           "shutting_down_error"]


def _assemble(config: RuntimeConfig,
              system: ActorSystem) -> tuple[Runtime, RunningRoot, Supervisor, Models]:
    """Every part of one runtime, each built after what it needs: the facade, the slot
    its running root goes in, the root supervisor to start, and the models (whose
    standby workers `open_runtime` closes last).

    The parts that reach the tree (the models start subtrees in the generation
    domain, the healer finds the reloader) get the `RunningRoot` slot, which exists
    now and holds the root once it runs; nothing refers to a part built later.
    """
    running = RunningRoot()
    table = StreamTable()
    transports: list[ChildSpec] = []
    healer = Healer(config, running.root)
    models = Models(config, system, generation=running.generation, on_failed=healer.failed)
    keep_alive = KeepAlive(config, models, lambda alias: any(
        buffer.model == alias for buffer in table.open_buffers()))
    requests = Requests(config, system, models, table, keep_alive)
    root = build_root(config, table, models.ref, models.specs, transports,
                      lambda: Reloader(healer, models), lambda: IdleUnloader(keep_alive))
    runtime = Runtime(config, system, running, models, requests, keep_alive, table,
                      transports)
    return runtime, running, root, models


@asynccontextmanager
async def open_runtime(config: RuntimeConfig | None = None, *,
                       models: Mapping[str, str] | None = None) -> AsyncIterator[Runtime]:
    """Start the supervision tree; load `config.generation.models` and `models`
    (alias → path). Leaving the block stops everything gracefully, standby workers
    included.

    Raises:
        EscalationError: the root gave up (restart intensity exceeded), with the chain.
        EngineClientError: ModelLoadError for a configured model that fails to load.
    """
    config = config or RuntimeConfig()
    if not structlog.is_configured():
        # An embedding application that configured structlog keeps its own setup.
        configure_logging(config.logging, default_level="warning")
    sup = config.supervision
    system = ActorSystem(mailbox_capacity=sup.mailbox_capacity, stash_limit=sup.stash_limit,
                         fairness_interval=sup.fairness_interval,
                         default_ask_timeout=config.calls.default_timeout_ms / 1000.0)
    runtime, running, tree, loaded_models = _assemble(config, system)
    try:
        async with open_supervisor(tree, system=system) as root:
            running.attach(root)
            for model in config.generation.models_in_load_order:
                await runtime.load_model(model.path, alias=model.alias,
                                         fallbacks=model.fallbacks,
                                         chat_template=model.chat_template,
                                         adapter_path=model.adapter_path,
                                         distributed=model.distributed)
            for alias, path in (models or {}).items():
                await runtime.load_model(path, alias=alias)
            yield runtime
    finally:
        await loaded_models.close_standbys()
