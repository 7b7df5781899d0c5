"""The MLX engine of one model in-process: a dedicated OS thread that loads and serves it.

Every MLX call for the model (load, `BatchGenerator` steps, sampling) runs in the
engine's one thread (see `corral.engine.core`), because MLX streams are thread-local: a
step taken from another thread than the last one raises, and pooled `trio.to_thread`
threads change under you. The trio side only enqueues commands (never blocks) and
receives steps and failures through `TrioToken.run_sync_soon`, in order. Tokenizer calls
(chat templates, encoding, decoding) touch no MLX: they run in a trio worker thread,
one at a time per engine, so a prompt that takes seconds to render and encode (a
megabyte of tools) delays neither the engine's steps nor the event loop.

This module knows nothing of actors, HTTP or supervision: it must never await a trio
primitive from the engine thread, never touch MLX from the trio thread, and never swallow
a step failure (the owner hears of it through `on_failure`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar, final

import structlog
import trio

from corral.engine.base import (
    EngineBase,
    EngineSettings,
    EngineStatistics,
    FaultKind,
    validate_sequence,
)
from corral.engine.core import STOP, Command, EngineCore
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import EngineSequence, EngineStep, ModelInfo
from corral.protocol.serving_messages import CancelSequence, InjectFault, Submit

__all__ = ["Engine"]

_log = structlog.get_logger("corral.engine")

T = TypeVar("T")

_OS_THREAD_EXIT_S: Final = 5.0  # a bound on waiting for an engine thread's OS-level exit
_thread_numbers = itertools.count(1)


@final
class Engine(EngineBase):
    """One model's MLX engine: a dedicated thread running continuous batching.

    Sequences join the batch at the next step after `submit` and leave it when they
    finish, at `cancel`, or when a stop string appears. Each `BatchGenerator.next()`
    call is one numbered `EngineStep` posted to `on_step` in the trio thread, holding a
    `TokenOut` for every sequence that produced a token in it.

    Steps are pipelined by mlx_lm: a sequence's prompt is processed in chunks, one a
    step, sized from the measured speed (see `corral.engine.pacing`); its id is in the
    `prefilled` of the step that ends it, its first token is sampled in the same step and
    returned by the next one, and every step samples the token the following step
    returns. So the sampler of a sequence is called exactly once per token, in order,
    and a sequence removed between steps never emits the token sampled ahead for it.

    Args:
        settings: the model and how to run it: batch sizes, pacing and the prefix
            cache. A sequence that shares a long prefix with one still prefilling waits
            for it, then starts from its KV.
        on_step: called in the trio thread with every step, in order. It must not
            block; if it raises, the engine fails as if a step had raised.
        on_failure: called in the trio thread, at most once, when a step raises (the
            engine thread has stopped by then). Not called after `close`.
    """

    def __init__(self, settings: EngineSettings, *,
                 on_step: Callable[[EngineStep], None],
                 on_failure: Callable[[BaseException], None]) -> None:
        super().__init__(settings, on_step, on_failure)
        # Shared between the threads: set once by either side (_closing), or written by
        # one side and read by the other.
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._submitted = 0  # callers of submit, under _submit_lock
        self._submit_lock = threading.Lock()
        self._outbox: list[EngineStep] = []  # steps awaiting the trio thread
        self._outbox_lock = threading.Lock()
        self._flush_pending = False
        self._core = EngineCore(self.settings, self._commands, self._closing,
                                self._post_step)
        self._tokenizer_turns = trio.CapacityLimiter(1)  # tokenizer calls, one at a time

        # Trio thread only.
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._loaded = trio.Event()
        self._exited = trio.Event()
        self._load_result: ModelInfo | BaseException | None = None
        self._failed = False

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
        # The first encode may write the tokenizer's truncation and padding settings;
        # made now, before any step decodes, every later one only reads beside them.
        with contextlib.suppress(EngineClientError):
            await self._tokenizer_call(lambda tok: list(tok.encode("")), list)
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
        validate_sequence(seq, info.vocab_size, structured_output=info.structured_output)
        with self._submit_lock:
            self._submitted += 1
        self._commands.put(Submit(seq))

    def cancel(self, seq_id: int) -> None:
        """Remove a sequence from the batch before the next step.

        The sequence emits nothing more, not even a final TokenOut. Cancelling an id
        that is not live does nothing. Thread-safe and never blocks.
        """
        if not self._stopped:
            self._commands.put(CancelSequence(seq_id))

    def inject_fault(self, kind: FaultKind) -> None:
        """Test hook: break the engine at its next step.

        ``"raise"`` makes the step raise ``RuntimeError("injected engine fault")``, so
        `on_failure` is called; ``"hang"`` blocks the engine thread instead of stepping,
        until `close`; ``"stuck"`` blocks it for 2 s, deaf to `close`; ``"slow"`` makes
        every later step sleep 10 ms per prompt token it prefills (a slow machine: slow,
        not stuck). ``"exit"`` and ``"segfault"`` end a worker process; in-process they
        do nothing.

        Raises:
            EngineClientError: ModelNotLoaded if the engine is not serving.
        """
        self._require_running()
        self._commands.put(InjectFault(kind))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Encode text with the model's tokenizer (in a worker thread).

        On cancellation the call still runs; its result is dropped.

        Raises:
            EngineClientError: TokenizerError if the tokenizer refuses the input;
                ModelNotLoaded if the engine is not serving.
        """
        return await self._tokenizer_call(
            lambda tok: list(tok.encode(text, add_special_tokens=add_special_tokens)), list)

    async def detokenize(self, ids: list[int]) -> str:
        """Decode token ids with the model's tokenizer (in a worker thread).

        On cancellation the call still runs; its result is dropped.

        Raises:
            EngineClientError: TokenizerError if an id is not in the vocabulary;
                ModelNotLoaded if the engine is not serving.
        """
        vocab_size = self._require_running().vocab_size
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise EngineClientError(
                Code.TOKENIZER_ERROR, f"token ids out of range [0, {vocab_size}): {bad[:8]}"
            )
        return await self._tokenizer_call(lambda tok: str(tok.decode(ids)), str)

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Render chat messages (and `tools`, when given) with the model's template and
        encode them (in a worker thread); `kwargs` are more variables for the template
        (a request's `chat_template_kwargs`, as `mlx_lm.server` passes them).

        On cancellation the call still runs; its result is dropped.

        Raises:
            EngineClientError: TokenizerError if there is no template or it refuses
                the messages; ModelNotLoaded if the engine is not serving.
        """

        def render(tok: Any) -> list[int]:
            if not tok.has_chat_template:
                raise ValueError("the model has no chat template")
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                tools=tools, **(kwargs or {}),
            )
            return [int(i) for i in ids]

        return await self._tokenizer_call(render, list)

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
        """The engine's counters now (see `EngineStatistics`); never blocks."""
        return self._core.statistics(self._submitted)

    async def _tokenizer_call(self, fn: Callable[[Any], T], returns: type[T]) -> T:
        """`fn(tokenizer)` in a worker thread, after the calls before it. On
        cancellation the caller leaves at once; the call still runs to its end, and the
        next one waits for it."""
        self._require_running()
        tokenizer = self._core.tokenizer
        if tokenizer is None:  # the engine thread is tearing down
            raise EngineClientError(Code.MODEL_NOT_LOADED,
                                    f"the engine of {self.path} stopped", {"path": self.path})
        try:
            value = await trio.to_thread.run_sync(fn, tokenizer, abandon_on_cancel=True,
                                                  limiter=self._tokenizer_turns)
        except Exception as exc:
            raise EngineClientError(Code.TOKENIZER_ERROR,
                                    f"{type(exc).__name__}: {exc}") from None
        assert isinstance(value, returns)
        return value

    def _request_stop(self) -> None:
        self._close_requested = True
        self._halt()

    def _halt(self) -> None:
        """Tell the engine thread to stop after its current step."""
        self._stopped = True
        self._closing.set()
        self._commands.put(STOP)

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
        self._loaded.set()  # in case the thread died before it reported the load
        self._exited.set()

    # -- engine thread ------------------------------------------------------------

    def _run(self) -> None:
        core = self._core
        try:
            try:
                info = core.load()
            except Exception as exc:
                _log.warning("engine.load_failed", path=self.path, error=repr(exc))
                self._post(self._on_loaded, exc)
                return
            self._post(self._on_loaded, info)
            core.serve()
        except BaseException as exc:
            self._post(self._fail, exc)
        finally:
            core.teardown()
            self._post(self._on_exit)

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
