"""What an engine's owner sees: the engine protocol and the one factory that makes one.

`make_engine` is where isolation is chosen, in one place: the in-process thread engine
(`corral.engine.thread`) or a worker process (`corral.engine.process`). Both satisfy
`EngineClient`; owners (the model actor, benchmarks) program against that alone, and
hand the engine its callbacks explicitly. This module also re-exports what owners need
beside it: statistics, fault kinds, sequence validation, the standby worker.

It must never hold engine state or know who owns an engine (an actor, a test).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from corral.config import GenerationConfig, PythonRuntimeConfig
from corral.engine.base import (
    EngineSettings,
    EngineStatistics,
    FaultKind,
    ProcessEngineStatistics,
    validate_sequence,
)
from corral.engine.process import ProcessEngine
from corral.engine.spawn import StartSoon, WorkerExitedError, WorkerStandby, worker_command
from corral.engine.thread import Engine
from corral.protocol.gang import DistributedSettings
from corral.protocol.messages import EngineSequence, EngineStep, ModelInfo

__all__ = [
    "EngineClient", "EngineSettings", "EngineStatistics", "FaultKind",
    "ProcessEngineStatistics", "StartSoon", "WorkerExitedError", "WorkerStandby",
    "make_engine", "validate_sequence", "worker_command",
]


class EngineClient(Protocol):
    """One model's engine, wherever it runs: what its owner may call.

    Callbacks (`on_step`, `on_failure`) run in the owner's trio thread, never during
    one of these calls. The sync calls never block; the async ones are tokenizer calls
    that, on cancellation, still run where the engine runs and drop their answer.
    """

    @property
    def path(self) -> str: ...

    async def start(self) -> ModelInfo:
        """Load the model and serve. Raises ModelLoadError; on cancellation the engine
        stops (`close` still waits for that)."""
        ...

    def submit(self, seq: EngineSequence) -> None:
        """Queue a sequence for the next step. Raises InvalidParams, ModelNotLoaded."""
        ...

    def cancel(self, seq_id: int) -> None:
        """Remove a sequence before the next step; unknown ids do nothing."""
        ...

    def inject_fault(self, kind: FaultKind) -> None:
        """Test hook: break the engine (see `FaultKind`). Raises ModelNotLoaded."""
        ...

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Raises TokenizerError, ModelNotLoaded."""
        ...

    async def detokenize(self, ids: list[int]) -> str:
        """Raises TokenizerError, ModelNotLoaded."""
        ...

    async def apply_chat_template(self, messages: list[dict[str, Any]],
                                  add_generation_prompt: bool = True,
                                  tools: list[dict[str, Any]] | None = None,
                                  kwargs: dict[str, Any] | None = None) -> list[int]:
        """`kwargs`: more variables for the template (`chat_template_kwargs`).
        Raises TokenizerError (no template, or it refuses), ModelNotLoaded."""
        ...

    async def close(self) -> None:
        """Stop and wait until stopped; idempotent. No callback runs after it."""
        ...

    def close_nowait(self) -> None:
        """Tell the engine to stop; do not wait. Idempotent."""
        ...

    def statistics(self) -> EngineStatistics:
        """The engine's counters now."""
        ...


def make_engine(path: str, generation: GenerationConfig, python: PythonRuntimeConfig, *,
                on_step: Callable[[EngineStep], None],
                on_failure: Callable[[BaseException], None],
                start_soon: StartSoon,
                standby: WorkerStandby | None = None,
                chat_template: str | None = None,
                adapter_path: str | None = None,
                distributed: DistributedSettings | None = None) -> EngineClient:
    """The engine of one model, not started: in a thread or in a worker process, as
    `generation.isolation` says; a gang of worker processes when `distributed` is set,
    whatever the isolation.

    Args:
        path: a local model directory for ``mlx_lm.load``.
        generation: the isolation, and the engine's batching, pacing and prefix cache
            (its `EngineTuning` fields, all of them).
        python: how a worker process starts and heartbeats (process isolation only).
        on_step: called in the trio thread with every step, in order; it must not
            block. If it raises, the engine fails.
        on_failure: called in the trio thread at most once, when the engine fails
            after it started (a failed start is `start`'s error instead).
        start_soon: runs a background task of the engine (the worker's frame reader)
            until the engine is closed, e.g. the owner's `nursery.start_soon`. A
            thread engine does not use it.
        standby: the model's worker started ahead of need, adopted by a process engine
            (process isolation only).
        chat_template: a Jinja chat template, or the path of a file holding one, to use
            instead of the model's own.
        adapter_path: a LoRA adapter directory applied at load.
        distributed: the gang that shares the model (see `DistributedSettings`).

    Returns:
        The engine, not started: its owner `start`s it, and `close`s it (or
        `close_nowait`s it) whatever happens.
    """
    settings = EngineSettings.of(generation, path, chat_template, adapter_path, distributed)
    if generation.isolation == "thread" and distributed is None:
        return Engine(settings, on_step=on_step, on_failure=on_failure)
    return ProcessEngine(
        settings, on_step=on_step, on_failure=on_failure, start_soon=start_soon,
        heartbeat_interval_ms=python.heartbeat_interval_ms,
        startup_timeout_ms=python.startup_timeout_ms,
        python_executable=python.python_executable, cpu_blas=generation.cpu_blas,
        worker_memory_limit_mb=python.worker_memory_limit_mb, standby=standby)
