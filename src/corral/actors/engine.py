"""The MLX engine of one model: a dedicated OS thread that loads it and runs its batches.

Every MLX call for the model (load, `BatchGenerator` steps, sampling) and every tokenizer
call runs in the engine's one thread, because MLX streams are thread-local: a step taken
from another thread than the last one raises, and pooled `trio.to_thread` threads change
under you. The trio side only enqueues commands (never blocks) and receives steps,
replies and failures through `TrioToken.run_sync_soon`, in order.

This module knows nothing of actors, HTTP or supervision: it must never await a trio
primitive from the engine thread, never touch MLX from the trio thread, and never swallow
a step failure (the model actor crashes and its supervisor restarts it).
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, final

import msgspec
import structlog
import trio

from corral.config import PrefixCacheConfig, default_prefix_cache_bytes
from corral.engine.prefix_cache import PrefixCache, reusable
from corral.engine.prefix_disk import DiskPrefixStore, model_identity
from corral.engine.prefix_index import BLOCK, common_prefix_length
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import (
    EngineSequence,
    EngineStep,
    FinishReason,
    ModelInfo,
    PrefixCacheStatistics,
    SamplingParams,
    TokenOut,
)

__all__ = ["Engine", "EngineStatistics", "FaultKind", "validate_sequence"]

_log = structlog.get_logger("corral.engine")

FaultKind = Literal["raise", "hang"]

_MASK64 = (1 << 64) - 1
_OS_THREAD_EXIT_S = 5.0  # a bound on waiting for an engine thread's OS-level exit
# A sequence waits for a sequence ahead of it to finish prefilling when that one will
# compute at least this many of its leading tokens that no cache holds yet.
_SHARE_AT_LEAST = 2 * BLOCK
_thread_numbers = itertools.count(1)


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
        loaded: the model is loaded and the engine thread serves commands.
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


# -- commands: the trio side puts them on a queue, the engine thread applies them ------


@dataclass(eq=False)
class _Reply:
    """Where the engine thread's answer to one call lands, in the trio thread."""

    event: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _Submit:
    seq: EngineSequence


@dataclass(frozen=True)
class _Cancel:
    seq_id: int


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Any], Any]
    reply: _Reply


@dataclass(frozen=True)
class _Fault:
    kind: FaultKind


class _Stop:
    pass


_Command = _Submit | _Cancel | _Call | _Fault | _Stop
_STOP = _Stop()


# -- per-sequence state, owned by the engine thread -----------------------------------


def _key_seed(seed: int, index: int) -> int:
    """A 64-bit key seed from (seed, token index): splitmix64 of their mix.

    Stands in for a fold-in, which `mx.random` lacks: the key of token `index` is
    `mx.random.key(_key_seed(seed, index))`, so it depends on nothing else.
    """
    z = ((seed & _MASK64) + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _make_sampler(sampling: SamplingParams, seed: int, start: int, vocab_size: int) -> Any:
    """A sampler for one sequence, or None for greedy (the batch's shared argmax).

    `GenerationBatch` calls it once per token of its sequence, the first call for token
    index `start` (see the note in `Engine` on mlx_lm's pipelining), with one row of
    log-probabilities, or the whole batch when the batch holds this sequence alone.
    """
    if sampling.temperature == 0.0:
        return None
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    filters: list[Callable[[Any], Any]] = []
    top_p, min_p, top_k = sampling.top_p, sampling.min_p, sampling.top_k
    # The same filters, in the same order, as mlx_lm's make_sampler.
    if 0.0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p, 1))
    if 0 < top_k < vocab_size:
        filters.append(lambda x: apply_top_k(x, top_k))
    inverse_temperature = 1.0 / sampling.temperature
    index = start

    def sample(logprobs: Any) -> Any:
        nonlocal index
        key = mx.random.key(_key_seed(seed, index))
        index += 1
        for keep in filters:
            logprobs = keep(logprobs)
        return mx.random.categorical(logprobs * inverse_temperature, key=key)

    return sample


class _Text:
    """Incremental detokenizing with stop strings: text is never emitted past one.

    `emitted` counts the characters of the detokenizer's text already handed out. A
    suffix of the text that could begin a stop string is held back until the next
    token decides it. What is held back is a function of the tokens alone, so feeding a
    resumed sequence's generated tokens through `push` reproduces exactly the state of
    the uninterrupted run.
    """

    def __init__(self, detokenizer: Any, stops: list[str]) -> None:
        self._detokenizer = detokenizer
        self._stops = [s for s in stops if s]
        self._emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; return the newly releasable text and whether a stop matched."""
        self._detokenizer.add_token(token)
        return self._release(final=False)

    def finish(self) -> tuple[str, bool]:
        """Flush the detokenizer; return the rest of the text and whether a stop matched."""
        self._detokenizer.finalize()
        return self._release(final=True)

    def _release(self, *, final: bool) -> tuple[str, bool]:
        text: str = self._detokenizer.text
        start = self._emitted
        # A stop string cannot begin before `start`: it would have been held back.
        hits = [i for i in (text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            end = min(hits)
            self._emitted = end
            return text[start:end], True
        end = len(text) if final else len(text) - self._held_back(text, start)
        self._emitted = end
        return text[start:end], False

    def _held_back(self, text: str, start: int) -> int:
        """Length of the longest suffix of text[start:] that is a proper prefix of a stop."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text) - start), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    uid: int
    text: _Text
    logprobs: bool
    tokens: list[int]  # prompt + generated as submitted: what its prefill computes
    cached_tokens: int  # leading tokens taken from the prefix cache, not prefilled
    prefilled: bool = False
    reported: bool = False  # cached_tokens went out with the first TokenOut


# -- the engine ----------------------------------------------------------------------


@final
class Engine:
    """One model's MLX engine: a dedicated thread running continuous batching.

    Sequences join the batch at the next step after `submit` and leave it when they
    finish, at `cancel`, or when a stop string appears. Each `BatchGenerator.next()`
    call is one numbered `EngineStep` posted to `on_step` in the trio thread, holding a
    `TokenOut` for every sequence that produced a token in it.

    Steps are pipelined by mlx_lm: a sequence's prompt is processed in one step (its
    id is in that step's `prefilled`), its first token is sampled in the same step and
    returned by the next one, and every step samples the token the following step
    returns. So the sampler of a sequence is called exactly once per token, in order,
    and a sequence removed between steps never emits the token sampled ahead for it.

    Args:
        path: a local model directory for ``mlx_lm.load``.
        prefill_batch_size: prompts prefilled together at most.
        completion_batch_size: sequences decoding together at most.
        prefill_step_size: prompt tokens per forward pass while prefilling.
        prefix_cache: reuse of the KV of prompt prefixes seen before (see
            `corral.engine.prefix_cache`). A sequence that shares a long prefix with one
            still prefilling waits for it, then starts from its KV.
        on_step: called in the trio thread with every step, in order. It must not
            block; if it raises, the engine fails as if a step had raised.
        on_failure: called in the trio thread, at most once, when a step raises (the
            engine thread has stopped by then). Not called after `close`.
    """

    def __init__(
        self,
        path: str,
        *,
        prefill_batch_size: int = 8,
        completion_batch_size: int = 32,
        prefill_step_size: int = 2048,
        prefix_cache: PrefixCacheConfig = PrefixCacheConfig(),
        on_step: Callable[[EngineStep], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.path = str(path)
        self._prefill_batch_size = prefill_batch_size
        self._completion_batch_size = completion_batch_size
        self._prefill_step_size = prefill_step_size
        self._prefix_config = prefix_cache
        self._on_step = on_step
        self._on_failure = on_failure

        # Shared between the threads: set once by either side (_closing, _serving) or
        # written by one side and read by the other.
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._submitted = 0  # callers of submit, under _submit_lock
        self._submit_lock = threading.Lock()
        self._applied = 0  # engine thread: submits taken off the queue
        self._steps = 0  # engine thread, and the counters below
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_step_at: float | None = None
        self._serving = False
        self._outbox: list[EngineStep] = []  # steps awaiting the trio thread
        self._outbox_lock = threading.Lock()
        self._flush_pending = False

        # Trio thread only.
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._loaded = trio.Event()
        self._exited = trio.Event()
        self._load_result: ModelInfo | BaseException | None = None
        self._info: ModelInfo | None = None
        self._pending: set[_Reply] = set()
        self._failed = False
        self._close_requested = False
        self._stopped = False  # the thread exited or was told to stop

        # Engine thread only.
        self._model: Any = None
        self._tokenizer: Any = None
        self._generator: Any = None
        self._vocab_size = 0
        self._default_stops: Any = None
        self._by_uid: dict[int, _Sequence] = {}
        self._uid_of: dict[int, int] = {}
        self._prefix: PrefixCache | None = None
        # Sequences waiting for the uid they share a prefix with to finish prefilling.
        self._waiting_on: dict[int, list[EngineSequence]] = {}
        self._waiting: dict[int, int] = {}  # seq_id -> the uid it waits on
        self._fault: FaultKind | None = None

    # -- trio side ----------------------------------------------------------------

    async def start(self) -> ModelInfo:
        """Start the engine thread, load the model in it and wait until it is loaded.

        Returns:
            What the load found out about the model.

        Raises:
            EngineClientError: ModelLoadError if ``mlx_lm.load`` failed, once the
                engine thread has exited.
            RuntimeError: if the engine was started before.

        On cancellation the engine thread is told to stop: a load in progress cannot be
        interrupted, so the thread finishes it, then exits without serving. `close`
        waits for that.
        """
        if self._thread is not None:
            raise RuntimeError("an Engine starts once")
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._run, name=f"corral-engine-{next(_thread_numbers)}", daemon=True
        )
        self._thread.start()
        try:
            await self._loaded.wait()
        except trio.Cancelled:
            self._request_stop()
            raise
        result = self._load_result
        if isinstance(result, BaseException):
            await self._exited.wait()
            raise EngineClientError(
                Code.MODEL_LOAD_ERROR,
                f"cannot load {self.path}: {type(result).__name__}: {result}",
                {"path": self.path, "error": type(result).__name__},
            ) from result
        if not isinstance(result, ModelInfo):
            raise EngineClientError(
                Code.MODEL_LOAD_ERROR, f"the engine of {self.path} stopped while loading",
                {"path": self.path},
            )
        self._info = result
        return result

    def submit(self, seq: EngineSequence) -> None:
        """Queue a sequence; it joins the batch before the next step.

        A sequence with `generated` tokens resumes: prompt + generated is prefilled
        again and decoding continues at token index len(generated), with
        `seq.max_tokens` more tokens at most. Submitting an id that is still live
        replaces that sequence. Thread-safe and never blocks.

        Raises:
            EngineClientError: InvalidParams if the sequence cannot run (no tokens,
                max_tokens < 1, a token id outside the vocabulary, sampling parameters
                out of range); ModelNotLoaded if the engine is not serving.
        """
        info = self._require_running()
        validate_sequence(seq, info.vocab_size)
        with self._submit_lock:
            self._submitted += 1
        self._commands.put(_Submit(seq))

    def cancel(self, seq_id: int) -> None:
        """Remove a sequence from the batch before the next step.

        The sequence emits nothing more, not even a final TokenOut. Cancelling an id
        that is not live does nothing. Thread-safe and never blocks.
        """
        if not self._stopped:
            self._commands.put(_Cancel(seq_id))

    def inject_fault(self, kind: FaultKind) -> None:
        """Test hook: break the engine at its next step.

        ``"raise"`` makes the step raise ``RuntimeError("injected engine fault")``, so
        `on_failure` is called; ``"hang"`` blocks the engine thread instead of stepping,
        until `close`.
        """
        self._require_running()
        self._commands.put(_Fault(kind))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Encode text with the model's tokenizer (in the engine thread).

        Raises:
            EngineClientError: TokenizerError if the tokenizer refuses the input.
        """
        return await self._call(
            lambda tok: list(tok.encode(text, add_special_tokens=add_special_tokens))
        )

    async def detokenize(self, ids: list[int]) -> str:
        """Decode token ids with the model's tokenizer (in the engine thread).

        Raises:
            EngineClientError: TokenizerError if an id is not in the vocabulary.
        """
        vocab_size = self._require_running().vocab_size
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise EngineClientError(
                Code.TOKENIZER_ERROR, f"token ids out of range [0, {vocab_size}): {bad[:8]}"
            )
        return await self._call(lambda tok: str(tok.decode(ids)))

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render chat messages with the model's template and encode them.

        Raises:
            EngineClientError: TokenizerError if there is no template or it refuses
                the messages.
        """

        def render(tok: Any) -> list[int]:
            if not tok.has_chat_template:
                raise ValueError("the model has no chat template")
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True
            )
            return [int(i) for i in ids]

        return await self._call(render)

    async def close(self) -> None:
        """Stop the engine thread and wait until it has exited. Idempotent.

        The thread finishes the step it is in and drops the batch; no callback runs
        after this returns, and calls still waiting fail with ModelNotLoaded. An engine
        never started closes at once. On cancellation the thread still stops, but this
        no longer waits for it.

        "Exited" means the OS thread is gone, not only the Python thread: its
        thread-local destructors run after `Thread.is_alive()` turns False, and MLX's
        per-thread compile cache calls back into Python there. If the interpreter
        finalizes meanwhile, the process aborts ("terminate called without an active
        exception"), so an owner about to exit must wait for this.
        """
        if self._thread is None:
            self._stopped = True
            return
        self._request_stop()
        await self._exited.wait()
        # The exit callback is the thread's last act, so this loop ends at once.
        while self._thread.is_alive():
            await trio.sleep(0.001)
        with trio.move_on_after(_OS_THREAD_EXIT_S):
            while not _os_thread_gone(self._thread):
                await trio.sleep(0.001)

    def close_nowait(self) -> None:
        """Tell the engine thread to stop after its current step; do not wait.

        For owners that cannot wait (a crashed or cancelled actor's cleanup); the thread
        still exits on its own. Idempotent.
        """
        if self._thread is not None:
            self._request_stop()
        else:
            self._stopped = True

    def statistics(self) -> EngineStatistics:
        prefilling = sum(1 for s in list(self._by_uid.values()) if not s.prefilled)
        live = len(self._by_uid)
        prefix = self._prefix
        return EngineStatistics(
            steps=self._steps,
            active=live - prefilling,
            queued=(prefilling + len(self._waiting)
                    + max(0, self._submitted - self._applied)),
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            last_step_at=self._last_step_at,
            loaded=self._serving,
            prefix_cache=(prefix.statistics() if prefix is not None
                          else PrefixCacheStatistics()),
        )

    def _require_running(self) -> ModelInfo:
        if self._info is None or self._stopped:
            raise EngineClientError(
                Code.MODEL_NOT_LOADED, f"the engine of {self.path} is not running",
                {"path": self.path},
            )
        return self._info

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(tokenizer) in the engine thread between steps and return its result.

        On cancellation the call still runs; its result is dropped.
        """
        self._require_running()
        reply = _Reply()
        self._pending.add(reply)
        self._commands.put(_Call(fn, reply))
        try:
            await reply.event.wait()
        finally:
            self._pending.discard(reply)
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _request_stop(self) -> None:
        self._close_requested = True
        self._halt()

    def _halt(self) -> None:
        """Tell the engine thread to stop after its current step."""
        self._stopped = True
        self._closing.set()
        self._commands.put(_STOP)

    # Callbacks the engine thread posts; they run in the trio thread, in order.

    def _on_loaded(self, result: ModelInfo | BaseException) -> None:
        self._load_result = result
        self._loaded.set()

    def _deliver(self, step: EngineStep) -> None:
        if self._failed:
            return
        try:
            self._on_step(step)
        except Exception as exc:
            self._halt()
            self._fail(exc)

    def _answer(self, reply: _Reply, value: Any, error: BaseException | None) -> None:
        reply.value, reply.error = value, error
        reply.event.set()

    def _fail(self, exc: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        self._stopped = True
        _log.error("engine.failed", path=self.path, error=repr(exc))
        if not self._close_requested:
            self._on_failure(exc)

    def _on_exit(self) -> None:
        self._stopped = True
        self._serving = False
        error = EngineClientError(
            Code.MODEL_NOT_LOADED, f"the engine of {self.path} stopped", {"path": self.path}
        )
        for reply in list(self._pending):
            self._answer(reply, None, error)
        self._loaded.set()  # in case the thread died before it reported the load
        self._exited.set()

    # -- engine thread ------------------------------------------------------------

    def _post_step(self, step: EngineStep) -> None:
        """Queue a step for the trio thread; one wakeup carries every step queued since
        the last one was handled, so a busy trio thread costs the engine no extra
        wakeups. Steps stay in order, and before anything posted after them."""
        with self._outbox_lock:
            self._outbox.append(step)
            wake = not self._flush_pending
            self._flush_pending = True
        if wake:
            self._post(self._flush_steps)

    def _flush_steps(self) -> None:
        with self._outbox_lock:
            steps, self._outbox = self._outbox, []
            self._flush_pending = False
        for step in steps:
            self._deliver(step)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            # Nobody is left to serve: stop instead of stepping for no one.
            self._closing.set()

    def _run(self) -> None:
        try:
            try:
                info = self._load()
            except Exception as exc:
                _log.warning("engine.load_failed", path=self.path, error=repr(exc))
                self._post(self._on_loaded, exc)
                return
            self._serving = True
            self._post(self._on_loaded, info)
            self._serve()
        except _Halted:
            pass
        except BaseException as exc:
            self._post(self._fail, exc)
        finally:
            self._serving = False
            self._teardown()
            self._post(self._on_exit)

    def _load(self) -> ModelInfo:
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.generate import BatchGenerator, StopSequences

        # A stream made here belongs to this thread; mlx_lm's module-level
        # `generation_stream` belongs to whichever thread imported mlx_lm first.
        stream = mx.new_stream(mx.default_device())
        began = time.monotonic()
        with mx.stream(stream):
            model, tokenizer, config = mlx_lm.load(self.path, return_config=True)
        load_seconds = time.monotonic() - began
        self._model, self._tokenizer = model, tokenizer
        self._vocab_size = int(config.get("vocab_size") or len(tokenizer))
        eos = sorted(int(t) for t in tokenizer.eos_token_ids)
        self._default_stops = StopSequences([(t,) for t in eos])
        self._generator = BatchGenerator(
            model,
            completion_batch_size=self._completion_batch_size,
            prefill_batch_size=self._prefill_batch_size,
            prefill_step_size=self._prefill_step_size,
            stream=stream,
        )
        self._prefix = self._open_prefix_cache(model, config)
        max_context = config.get("max_position_embeddings")
        _log.debug("engine.loaded", path=self.path, seconds=round(load_seconds, 3))
        return ModelInfo(
            path=self.path,
            vocab_size=self._vocab_size,
            eos_token_ids=eos,
            max_context=int(max_context) if max_context is not None else None,
            load_seconds=load_seconds,
            has_chat_template=bool(tokenizer.has_chat_template),
        )

    def _open_prefix_cache(self, model: Any, config: dict[str, Any]) -> PrefixCache | None:
        from mlx_lm.models.cache import make_prompt_cache

        settings = self._prefix_config
        if not settings.enabled:
            return None
        if not reusable(make_prompt_cache(model)):
            _log.info("prefix_cache.off", path=self.path,
                      reason="this model's KV cache cannot be trimmed and merged")
            return None
        disk = None
        if settings.disk_dir is not None:
            try:
                disk = DiskPrefixStore(
                    settings.disk_dir, model_identity(self.path, config, model),
                    max_bytes=settings.disk_max_bytes, min_tokens=settings.disk_min_tokens)
            except OSError as exc:
                _log.warning("prefix_cache.disk_off", path=self.path,
                             disk_dir=settings.disk_dir, error=repr(exc))
        max_bytes = (settings.max_bytes if settings.max_bytes is not None
                     else default_prefix_cache_bytes())
        return PrefixCache(max_bytes=max_bytes, disk=disk)

    def _serve(self) -> None:
        while True:
            for command in self._drain(block=not self._by_uid):
                self._apply(command)
            if self._closing.is_set():
                return
            if self._by_uid:
                self._step()

    def _drain(self, *, block: bool) -> list[_Command]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Stop):
            raise _Halted
        if isinstance(command, _Submit):
            self._applied += 1
            self._insert(command.seq)
        elif isinstance(command, _Cancel):
            self._remove(command.seq_id)
        elif isinstance(command, _Call):
            try:
                value, error = command.fn(self._tokenizer), None
            except Exception as exc:
                value, error = None, EngineClientError(
                    Code.TOKENIZER_ERROR, f"{type(exc).__name__}: {exc}"
                )
            self._post(self._answer, command.reply, value, error)
        else:
            self._fault = command.kind

    def _insert(self, seq: EngineSequence) -> None:
        self._remove(seq.seq_id)
        tokens = [*seq.prompt, *seq.generated]
        leader = self._leader_for(tokens)
        if leader is None:
            self._start(seq, tokens)
        else:
            self._waiting_on.setdefault(leader, []).append(seq)
            self._waiting[seq.seq_id] = leader

    def _leader_for(self, tokens: list[int]) -> int | None:
        """The uid of a sequence still prefilling whose KV would save this one at least
        `_SHARE_AT_LEAST` tokens of prefill over what the cache holds now, or None.

        Waiting for it costs no more than prefilling those tokens again would, as long
        as they are at least half of what that sequence prefills: a short shared start
        is not worth waiting behind a long prompt for."""
        if self._prefix is None:
            return None
        covered = self._prefix.covered(tokens)
        best, best_shared = None, covered + _SHARE_AT_LEAST - 1
        for seq in self._by_uid.values():
            if not seq.prefilled:
                shared = min(common_prefix_length(seq.tokens, tokens), len(tokens) - 1)
                if shared > best_shared and 2 * shared >= len(seq.tokens) - seq.cached_tokens:
                    best, best_shared = seq.uid, shared
        return best

    def _start(self, seq: EngineSequence, tokens: list[int]) -> None:
        from mlx_lm.generate import StopSequences
        from mlx_lm.sample_utils import make_logits_processors

        sampling = seq.sampling
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8))
        start = len(seq.generated)
        stops = self._default_stops
        if sampling.stop_token_ids:
            ids = set(self._tokenizer.eos_token_ids) | set(sampling.stop_token_ids)
            stops = StopSequences([(t,) for t in sorted(ids)])
        processors = make_logits_processors(repetition_penalty=sampling.repetition_penalty)
        hit = self._prefix.lookup(tokens) if self._prefix is not None else None
        cached = hit.tokens if hit is not None else 0
        (uid,) = self._generator.insert(
            [tokens[cached:]],
            max_tokens=[seq.max_tokens],
            caches=[hit.cache] if hit is not None and hit.cache is not None else None,
            all_tokens=[tokens[:cached]],
            samplers=[_make_sampler(sampling, seed, start, self._vocab_size)],
            logits_processors=[processors],
            stop_sequences=[stops],
        )
        text = _Text(self._tokenizer.detokenizer, sampling.stop)
        for token in seq.generated:
            text.push(token)
        self._by_uid[uid] = _Sequence(seq.seq_id, uid, text, sampling.logprobs, tokens, cached)
        self._uid_of[seq.seq_id] = uid

    def _remove(self, seq_id: int) -> None:
        leader = self._waiting.pop(seq_id, None)
        if leader is not None:
            self._waiting_on[leader] = [
                s for s in self._waiting_on[leader] if s.seq_id != seq_id]
            return
        uid = self._uid_of.pop(seq_id, None)
        if uid is not None:
            seq = self._by_uid.pop(uid)
            kept = self._generator.remove([uid], return_prompt_caches=seq.prefilled)
            self._keep(kept)
            self._release_waiters(uid)

    def _release_waiters(self, uid: int) -> None:
        """Start the sequences that waited for `uid` to prefill; they look the cache up
        again now, and find its KV."""
        for seq in self._waiting_on.pop(uid, []):
            del self._waiting[seq.seq_id]
            self._start(seq, [*seq.prompt, *seq.generated])

    def _keep(self, caches: dict[int, tuple[list[Any], list[int]]], *,
              to_disk: bool = False) -> None:
        """Store sequences' KV (from `BatchGenerator.extract_cache` or `remove`)."""
        if self._prefix is not None:
            for cache, tokens in caches.values():
                self._prefix.store(list(tokens), cache, to_disk=to_disk)

    def _step(self) -> None:
        if self._fault == "hang":
            self._closing.wait()
            raise _Halted
        if self._fault == "raise":
            self._fault = None
            raise RuntimeError("injected engine fault")
        prompt_responses, generation_responses = self._generator.next()
        self._steps += 1
        prefilled: list[int] = []
        for response in prompt_responses:
            if response.end_of_prompt:
                seq = self._by_uid[response.uid]
                seq.prefilled = True
                self._prompt_tokens += len(seq.tokens) - seq.cached_tokens
                prefilled.append(seq.seq_id)
                if self._prefix is not None:
                    # Kept now, not only at the end, so sequences running alongside
                    # and a restart after a crash can start from this prompt's KV; the
                    # disk tier keeps prompts only (a resume re-prefills the few tokens
                    # generated), which halves what it writes.
                    self._keep(self._generator.extract_cache([response.uid]), to_disk=True)
                    self._release_waiters(response.uid)
        outputs: list[TokenOut] = []
        stopped: list[int] = []
        for response in generation_responses:
            seq = self._by_uid[response.uid]
            outputs.append(self._token_out(seq, response, stopped))
        self._generation_tokens += len(outputs)
        if stopped:
            self._keep(self._generator.remove(stopped, return_prompt_caches=True))
        self._last_step_at = time.monotonic()
        self._post_step(EngineStep(self._steps, outputs, prefilled))

    def _token_out(self, seq: _Sequence, response: Any, stopped: list[int]) -> TokenOut:
        token = int(response.token)
        finish: FinishReason | None = response.finish_reason
        if finish == "stop":
            # A stop token (EOS or stop_token_ids) ends the text without being in it.
            text, _ = seq.text.finish()
        else:
            text, hit = seq.text.push(token)
            if hit:
                finish = "stop"
                stopped.append(seq.uid)
            elif finish == "length":
                rest, hit = seq.text.finish()
                text += rest
                if hit:
                    finish = "stop"
        if finish is not None:
            del self._by_uid[seq.uid]
            del self._uid_of[seq.seq_id]
            if response.prompt_cache is not None:
                self._keep({seq.uid: (response.prompt_cache, response.all_tokens)})
        logprob = float(response.logprobs[token].item()) if seq.logprobs else None
        cached = 0 if seq.reported else seq.cached_tokens
        seq.reported = True
        return TokenOut(seq.seq_id, token, text, logprob, finish, cached)

    def _teardown(self) -> None:
        import mlx.core as mx

        try:
            if self._generator is not None:
                self._generator.close()
            self._generator = self._model = self._tokenizer = None
            self._by_uid.clear()
            self._uid_of.clear()
            self._waiting_on.clear()
            self._waiting.clear()
            if self._prefix is not None:
                self._prefix.close()
            # Give the model's memory back now, not when another model needs it.
            mx.clear_cache()
        except Exception as exc:  # the thread must still report its exit
            _log.warning("engine.teardown_failed", path=self.path, error=repr(exc))


def _os_thread_gone(thread: threading.Thread) -> bool:
    """Whether the OS thread behind a finished `thread` has ended, its thread-local
    destructors included: its /proc entry is gone (Linux), or it no longer takes a
    signal (elsewhere)."""
    if sys.platform == "linux" and thread.native_id is not None:
        return not os.path.exists(f"/proc/self/task/{thread.native_id}")
    if thread.ident is None:
        return True
    try:
        signal.pthread_kill(thread.ident, 0)
    except (ProcessLookupError, OSError):
        return True
    return False


class _Halted(Exception):
    """Raised inside the engine thread to leave its loop when told to stop."""


def validate_sequence(seq: EngineSequence, vocab_size: int) -> None:
    """Refuse, in the caller's thread, what would otherwise fail inside a step."""
    s = seq.sampling
    problems = []
    if not seq.prompt and not seq.generated:
        problems.append("the sequence has no tokens")
    if seq.max_tokens < 1:
        problems.append(f"max_tokens must be >= 1, got {seq.max_tokens}")
    bad = [t for t in (*seq.prompt, *seq.generated) if not 0 <= t < vocab_size]
    if bad:
        problems.append(f"token ids out of range [0, {vocab_size}): {bad[:8]}")
    if not s.temperature >= 0.0:
        problems.append(f"temperature must be >= 0, got {s.temperature}")
    if not 0.0 < s.top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1], got {s.top_p}")
    if not 0.0 <= s.min_p <= 1.0:
        problems.append(f"min_p must be in [0, 1], got {s.min_p}")
    if s.top_k < 0:
        problems.append(f"top_k must be >= 0, got {s.top_k}")
    if s.repetition_penalty is not None and not s.repetition_penalty >= 0.0:
        problems.append(f"repetition_penalty must be >= 0, got {s.repetition_penalty}")
    if problems:
        raise EngineClientError(
            Code.INVALID_PARAMS, "; ".join(problems), {"seq_id": seq.seq_id}
        )
