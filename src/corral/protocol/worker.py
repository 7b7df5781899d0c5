"""The frames between a `ProcessEngine` and its engine worker process (process isolation).

Each frame is one tagged Struct, msgpack-encoded and length-prefixed (`codec.frame`),
on the worker's stdin (parent to worker, `ToWorker`) or stdout (worker to parent,
`FromWorker`). A session runs:

    worker: Hello                      the readiness handshake, before any model work
    parent: Load                       then Submit / CancelSequence / Call / InjectFault
    worker: Loaded | LoadFailed        then Step / CallResult / Heartbeat, any order
    parent: Shutdown, then closes stdin; or just closes stdin (the worker exits at once)
    worker: Failed, then exits non-zero, when its engine fails

`Submit`, `CancelSequence` and `InjectFault` are the model actor's own messages
(`corral.protocol.messages`), carried on unchanged. Data only: this module never does I/O
and holds no behaviour.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from corral.protocol.errors import ErrorInfo
from corral.protocol.gang import DistributedSettings
from corral.protocol.messages import EngineStep, ModelInfo, PrefixCacheStatistics
from corral.protocol.serving_messages import CancelSequence, InjectFault, Submit

__all__ = [
    "PROTOCOL_VERSION", "Call", "CallArgs", "CallResult", "ChatTemplateArgs",
    "DetokenizeArgs", "EngineSettings", "EngineTuning", "Failed", "FromWorker", "Heartbeat",
    "Hello", "Load", "LoadFailed", "Loaded", "PrefixCacheConfig", "Shutdown", "Step",
    "ToWorker", "TokenizeArgs",
]

PROTOCOL_VERSION: Final = 9
"""Bumped on any change to these frames; a worker of another version is refused."""

_Positive = Annotated[int, msgspec.Meta(ge=1)]


class PrefixCacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Reuse of the KV cache of shared prompt prefixes, in memory and optionally on disk.

    `max_bytes: null` means one eighth of the machine's physical memory
    (`corral.engine.prefix_cache.default_prefix_cache_bytes`). The key
    `generation.prefix_cache` of the configuration, declared here because it crosses
    to the worker inside `EngineSettings` as it is.
    """

    enabled: bool = True
    max_bytes: Annotated[int, msgspec.Meta(ge=0)] | None = None
    disk_dir: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    disk_min_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256
    disk_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 4 * 1024**3


class EngineTuning(msgspec.Struct, frozen=True, kw_only=True):
    """How an engine batches, paces and caches, whatever the model: the one declaration.

    These are the keys of the configuration's `generation` section that reach the
    engine (`corral.config.GenerationConfig` inherits them, so a key's type, range and
    default are written here and nowhere else), and the part of `EngineSettings` every
    model shares.
    """

    prefill_batch_size: _Positive = 8
    """Prompts prefilled together in one step, at most."""
    completion_batch_size: _Positive = 32
    """Sequences decoding together in one step, at most."""
    prefill_step_size: _Positive = 2048
    """The most prompt tokens of one sequence in one step."""
    prefill_step_target_ms: _Positive = 2000
    """The measured work a step takes on while prompts are prefilled: long prompts are
    cut into chunks of about this long (see `corral.engine.pacing`)."""
    cpu_dequantize: Literal["auto", "off"] = "auto"
    """On a CPU device, "auto" turns quantized weights into float32 at load when they
    fit (see `corral.engine.loading`); "off" keeps them as stored."""
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig()
    """Reuse of the KV of prompt prefixes seen before; it lives where the engine runs."""


class EngineSettings(EngineTuning, frozen=True):
    """How an engine runs one model, the same in a thread and in a worker process: the
    shared `EngineTuning` and what belongs to this model.

    Attributes:
        path: a local model directory for ``mlx_lm.load``.
        chat_template: a Jinja chat template, or the path of a file holding one, to use
            instead of the model's own.
        adapter_path: a LoRA adapter directory applied at load, or None.
        distributed: the gang that shares the model, or None for one process.
    """

    path: str
    chat_template: str | None = None
    adapter_path: str | None = None
    distributed: DistributedSettings | None = None

    @classmethod
    def of(cls, tuning: EngineTuning, path: str, chat_template: str | None = None,
           adapter_path: str | None = None,
           distributed: DistributedSettings | None = None) -> EngineSettings:
        """The settings of the model at `path`, with every field of `tuning` (which may
        be a subclass, such as the configuration's `generation` section)."""
        shared = {name: getattr(tuning, name) for name in EngineTuning.__struct_fields__}
        return cls(path, chat_template, adapter_path, distributed, **shared)


# -- parent -> worker ----------------------------------------------------------------


class Load(msgspec.Struct, frozen=True, tag=True):
    """Load the model with these settings and start the engine; answered by `Loaded` or
    `LoadFailed`."""

    settings: EngineSettings


class TokenizeArgs(msgspec.Struct, frozen=True, tag="tokenize", tag_field="op"):
    text: str
    add_special_tokens: bool = True


class DetokenizeArgs(msgspec.Struct, frozen=True, tag="detokenize", tag_field="op"):
    ids: list[int]


class ChatTemplateArgs(msgspec.Struct, frozen=True, tag="apply_chat_template",
                       tag_field="op"):
    # Chat turns stay free-form mappings: the model's template decides what it accepts.
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = {}  # the request's `chat_template_kwargs`


CallArgs = TokenizeArgs | DetokenizeArgs | ChatTemplateArgs
"""A tokenizer call; its `op` field names the Engine method it runs."""


class Call(msgspec.Struct, frozen=True, tag=True):
    """Run a tokenizer call in the engine; answered by `CallResult` with `call_id`."""

    call_id: int
    args: CallArgs


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    """Close the engine (the current step ends, the batch is dropped) and exit 0."""


ToWorker = Load | Submit | CancelSequence | Call | InjectFault | Shutdown


# -- worker -> parent ----------------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag=True):
    """The worker reads frames now. Sent first, before anything heavy is imported."""

    pid: int
    version: int


class Loaded(msgspec.Struct, frozen=True, tag=True):
    info: ModelInfo


class LoadFailed(msgspec.Struct, frozen=True, tag=True):
    """The load raised; the worker then waits for `Shutdown` or the end of stdin."""

    error: ErrorInfo


class Step(msgspec.Struct, frozen=True, tag=True):
    """One engine step, in order, exactly as the in-process engine posts it."""

    step: EngineStep


class CallResult(msgspec.Struct, frozen=True, tag=True, omit_defaults=True):
    """The answer to `Call` number `call_id`: `value`, or `error` if it failed."""

    call_id: int
    value: list[int] | str | None = None
    error: ErrorInfo | None = None


class Heartbeat(msgspec.Struct, frozen=True, tag=True):
    """The worker's trio loop is alive, with its engine's counters.

    It comes from a task independent of the engine thread, so a hung engine still
    sends it: a silent worker is a dead or frozen process, a stale `last_step_age_s`
    with work in hand is a stalled engine.

    Attributes:
        steps: engine steps made.
        active: sequences decoding.
        queued: sequences received and not decoding yet.
        submits: `Submit` frames received, so the parent can count those in the pipe.
        prompt_tokens: prompt tokens prefilled.
        generation_tokens: tokens generated.
        last_step_age_s: seconds since the end of the last step; None before the first
            (the worker's own view, for logs: the parent times the step frames).
        prefix_cache: the engine's prefix cache counters.
        step_expected_s: the expected time of the step now running (see
            `corral.engine.pacing`), so the parent's watchdog scales its limit.
    """

    steps: int
    active: int
    queued: int
    submits: int
    prompt_tokens: int
    generation_tokens: int
    last_step_age_s: float | None
    prefix_cache: PrefixCacheStatistics = PrefixCacheStatistics()
    step_expected_s: float = 0.0


class Failed(msgspec.Struct, frozen=True, tag=True):
    """The engine failed (`error` is the exception's repr); the worker exits non-zero."""

    error: str


FromWorker = Hello | Loaded | LoadFailed | Step | CallResult | Heartbeat | Failed
