"""What the thread engine and the worker-process engine share, and nothing else.

Their settings and keyword options, their statistics (and the worker's few more),
sequence validation (done in the caller's thread, before anything reaches MLX), and
`EngineBase`: the callbacks, the "is it serving" check, and the tokenizer calls waiting
for an answer. `corral.engine.api` re-exports the public names; owners import them from
there.

Trio thread only, except `validate_sequence`. It must never touch MLX, start a thread
or a process, or know which isolation it serves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal, TypedDict, TypeVar

import msgspec
import trio

from corral.config import PrefixCacheConfig
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import (
    EngineSequence,
    EngineStep,
    ModelInfo,
    PrefixCacheStatistics,
)
from corral.protocol.serving_messages import FaultKind
from corral.protocol.worker import EngineSettings

__all__ = ["EngineBase", "EngineOptions", "EngineSettings", "EngineStatistics", "FaultKind",
           "ProcessEngineStatistics", "validate_sequence"]

T = TypeVar("T")


class EngineOptions(TypedDict, total=False):
    """The keyword options of both engines; each defaults as in `EngineSettings`.

    Attributes:
        prefill_batch_size: prompts prefilled together at most.
        completion_batch_size: sequences decoding together at most.
        prefill_step_size: the most prompt tokens of one sequence in one step.
        prefill_step_target_ms: the measured work a step takes on while prompts are
            prefilled (see `corral.engine.pacing`).
        chat_template: a Jinja chat template, or the path of a file holding one, to use
            instead of the model's own.
        adapter_path: a LoRA adapter directory applied at load, or None.
        cpu_dequantize: float32 weights on a CPU device (see `corral.engine.loading`).
        prefix_cache: reuse of the KV of prompt prefixes seen before (see
            `corral.engine.prefix_cache`); it lives where the engine runs.
    """

    prefill_batch_size: int
    completion_batch_size: int
    prefill_step_size: int
    prefill_step_target_ms: int
    prefix_cache: PrefixCacheConfig
    chat_template: str | None
    adapter_path: str | None
    cpu_dequantize: Literal["auto", "off"]


class EngineStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one engine.

    Attributes:
        steps: `BatchGenerator.next()` calls made; the number of the last posted step.
        active: sequences decoding (their prompt is processed).
        queued: sequences submitted and not decoding yet (in the command queue, waiting
            for prefill or being prefilled).
        prompt_tokens: prompt tokens prefilled, re-prefilled resumed tokens included.
        generation_tokens: tokens generated.
        last_step_at: `time.monotonic()` at the end of the last step, or None.
        loaded: the model is loaded and the engine serves commands.
        step_expected_s: seconds the step now running is expected to take, from the
            measured speed of earlier steps; 0 between steps and before any measurement
            (see `corral.engine.pacing`).
        prefix_cache: the prefix cache's counters (all zero while it is off).
    """

    steps: int
    active: int
    queued: int
    prompt_tokens: int
    generation_tokens: int
    last_step_at: float | None
    loaded: bool
    prefix_cache: PrefixCacheStatistics = PrefixCacheStatistics()
    step_expected_s: float = 0.0


class ProcessEngineStatistics(EngineStatistics, frozen=True):
    """`EngineStatistics` of a worker process, as its steps and heartbeats tell them.

    `steps`, `generation_tokens` and `last_step_at` (when the last step frame arrived,
    by this process's `time.monotonic()`) follow every step frame; `active`, `queued`
    and `prompt_tokens` are as of the last heartbeat (`queued` adds the sequences sent
    since). A hung engine keeps heartbeating, so a stale `last_step_at` with work in
    hand is how an owner's watchdog sees it.

    Attributes:
        pid: the worker's process id, None before it started.
        hello_at: `time.monotonic()` when the worker's Hello arrived: it was ready for
            its model from then on.
        last_heartbeat_at: `time.monotonic()` when the last heartbeat arrived.
    """

    pid: int | None = None
    hello_at: float | None = None
    last_heartbeat_at: float | None = None


def validate_sequence(seq: EngineSequence, vocab_size: int, *,
                      structured_output: bool = True) -> None:
    """Refuse, in the caller's thread, what would otherwise fail inside a step
    (`structured_output`: whether the model can take a grammar, `ModelInfo`'s flag).

    The sampling's ranges are its type's (`SamplingParams.validate`, for a sequence
    built in Python rather than decoded); what is checked here depends on the model.

    Raises:
        EngineClientError: InvalidParams naming the first range refused, or every
            problem with the model found.
    """
    s = seq.sampling
    s.validate()
    problems = []
    if not seq.prompt and not seq.generated:
        problems.append("the sequence has no tokens")
    if s.max_tokens is None:
        problems.append("max_tokens must be set for the engine")
    elif seq.remaining < 1:
        problems.append(f"max_tokens {s.max_tokens} leaves no token to generate after "
                        f"the {len(seq.generated)} generated")
    bad = [t for t in (*seq.prompt, *seq.generated) if not 0 <= t < vocab_size]
    if bad:
        problems.append(f"token ids out of range [0, {vocab_size}): {bad[:8]}")
    bad_bias = [t for t in s.logit_bias if not 0 <= t < vocab_size]
    if bad_bias:
        problems.append(f"logit_bias: token ids out of range [0, {vocab_size}): {bad_bias[:8]}")
    if seq.grammar is not None and not structured_output:
        problems.append("grammar: this model's tokenizer cannot drive structured output")
    if problems:
        raise EngineClientError(
            Code.INVALID_PARAMS, "; ".join(problems), {"seq_id": seq.seq_id}
        )


class _PendingCall:
    """Where the answer to one tokenizer call lands, in the trio thread."""

    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: object = None
        self.error: BaseException | None = None

    def settle(self, value: object = None, error: BaseException | None = None) -> None:
        """Answer the call: with `value`, or with `error` to raise in its caller."""
        self.value, self.error = value, error
        self.event.set()


class EngineBase:
    """The part of an engine that does not depend on where it runs.

    Subclasses set `_info` once the model is loaded and `_stopped` once the engine
    takes no more commands. One whose tokenizer calls are answered elsewhere (a worker
    process) sends them through `_call`, answering them with `_answer` or failing them
    all with `_fail_calls`.

    Args:
        path: a local model directory for ``mlx_lm.load``, or complete settings (then
            `options` must be empty).
        options: the keyword options (see `EngineOptions`).
        on_step: called in the trio thread with every step, in order; it must not
            block.
        on_failure: called in the trio thread at most once, when the engine fails.
    """

    def __init__(self, path: str | EngineSettings, options: EngineOptions,
                 on_step: Callable[[EngineStep], None],
                 on_failure: Callable[[BaseException], None]) -> None:
        if isinstance(path, EngineSettings):
            if options:
                raise TypeError("give the engine settings or options, not both")
            self.settings = path
        else:
            self.settings = EngineSettings(str(path), **options)
        self.path = self.settings.path
        self._on_step = on_step
        self._on_failure = on_failure
        self._info: ModelInfo | None = None
        self._stopped = False  # no more commands: closing, or the engine is gone
        self._close_requested = False
        self._calls: dict[int, _PendingCall] = {}
        self._call_ids = itertools.count(1)

    def _require_running(self) -> ModelInfo:
        """The loaded model's info.

        Raises:
            EngineClientError: ModelNotLoaded if the engine is not serving.
        """
        if self._info is None or self._stopped:
            raise EngineClientError(
                Code.MODEL_NOT_LOADED, f"the engine of {self.path} is not running",
                {"path": self.path})
        return self._info

    async def _call(self, send: Callable[[int], None], returns: type[T]) -> T:
        """Send a tokenizer call with `send(call_id)` and wait for its answer.

        On cancellation the call still runs where the engine runs; its answer is
        dropped.

        Raises:
            EngineClientError: ModelNotLoaded if the engine is not serving, or stops
                before it answers; whatever error the call was answered with.
        """
        self._require_running()
        call_id = next(self._call_ids)
        reply = self._calls[call_id] = _PendingCall()
        send(call_id)
        try:
            await reply.event.wait()
        finally:
            self._calls.pop(call_id, None)
        if reply.error is not None:
            raise reply.error
        value = reply.value
        assert isinstance(value, returns)
        return value

    def _answer(self, call_id: int, value: object = None,
                error: BaseException | None = None) -> None:
        """Answer the call `call_id` if its caller still waits."""
        reply = self._calls.pop(call_id, None)
        if reply is not None:
            reply.settle(value, error)

    def _fail_calls(self) -> None:
        """Fail every call still waiting: the engine has stopped."""
        error = EngineClientError(Code.MODEL_NOT_LOADED,
                                  f"the engine of {self.path} stopped", {"path": self.path})
        calls, self._calls = self._calls, {}
        for reply in calls.values():
            reply.settle(error=error)
