"""The engine thread's side of one model: its batch, its sequences, its prefix cache.

`EngineCore` loads the model, then applies the commands the trio side queues (submit,
cancel, faults) and takes `BatchGenerator` steps, handing each step to a callback that
carries it over to the trio thread. `corral.engine.thread`
owns the thread it runs in.

Engine thread only (`statistics` excepted, which reads counters from any thread). It must
never touch trio, never block but on its command queue, and never swallow a step failure:
it raises out of `serve`, and the engine fails.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
import structlog

from corral.engine.base import EngineSettings, EngineStatistics, FaultKind
from corral.engine.guidance import Guidance, thinking, tool_calling
from corral.engine.live_sequence import LiveSequence
from corral.engine.loading import load_weights
from corral.engine.lockstep import Lockstep
from corral.engine.pacing import StepPacer
from corral.engine.prefill_sharing import PrefillSharing
from corral.engine.prefix_cache import PrefixCache, open_prefix_cache
from corral.engine.sampling import logits_processors, sequence_sampler, stop_token_ids
from corral.engine.text import StopText
from corral.protocol.gang import GangOp, GangTick, GrammarCompiled, Halt
from corral.protocol.messages import (
    EngineSequence,
    EngineStep,
    ModelInfo,
    PrefixCacheStatistics,
    TokenOut,
)
from corral.protocol.serving_messages import CancelSequence, Submit

__all__ = ["STOP", "Command", "EngineCore"]

_log = structlog.get_logger("corral.engine")

_SLOW_S_PER_TOKEN: Final = 0.01  # what the "slow" fault adds to a step per prompt token
_STUCK_S: Final = 2.0  # how long the "stuck" fault blocks a step


STOP: Final = Halt()

Command = GangOp
"""What the trio side (and the guidance thread) puts on the command queue; in a gang,
rank 0 hands the same commands, as it applied them, to the other ranks."""


class _Halted(Exception):
    """Raised inside the engine thread to leave `serve` when told to stop."""


class EngineCore:
    """One model's continuous batching, run by one engine thread.

    Args:
        settings: the model and its batching limits.
        commands: the queue the trio side fills; `serve` drains it between steps.
        closing: set by the trio side (or when nobody is left to serve): `serve` returns
            at its next check, and a hung step (the "hang" fault) lets go.
        post_step: takes every step, in order, to the trio thread; never blocks.
    """

    def __init__(self, settings: EngineSettings, commands: queue.SimpleQueue[Command],
                 closing: threading.Event, post_step: Callable[[EngineStep], None]) -> None:
        self.settings = settings
        self.path = settings.path
        self._commands = commands
        self._closing = closing
        self._post_step = post_step
        # Read from the trio thread by `statistics`, written here only.
        self.serving = False
        self._applied = 0  # submits taken off the queue
        self._steps = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_step_at: float | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._generator: Any = None
        self._vocab_size = 0
        self._eos: list[int] = []
        self._default_stops: Any = None
        self._by_uid: dict[int, LiveSequence] = {}
        self._uid_of: dict[int, int] = {}
        self._prefix: PrefixCache | None = None
        # Sequences waiting for the uid they share a prefix with to finish prefilling.
        self._sharing = PrefillSharing()
        self._guidance: Guidance | None = None
        self._compiling: dict[int, EngineSequence] = {}  # waiting for their grammar
        self._fault: FaultKind | None = None
        self._lockstep: Lockstep | None = None  # in a gang (see `corral.protocol.gang`)
        self._pacer = StepPacer(settings.prefill_step_target_ms / 1000.0,
                                settings.prefill_step_size)

    def statistics(self, submitted: int) -> EngineStatistics:
        """The counters now, `submitted` being the submits the trio side has queued."""
        prefilling = sum(1 for s in list(self._by_uid.values()) if not s.prefilled)
        live = len(self._by_uid)
        prefix = self._prefix
        return EngineStatistics(
            steps=self._steps,
            active=live - prefilling,
            queued=(prefilling + len(self._sharing) + len(self._compiling)
                    + max(0, submitted - self._applied)),
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            last_step_at=self._last_step_at,
            loaded=self.serving,
            prefix_cache=(prefix.statistics() if prefix is not None
                          else PrefixCacheStatistics()),
            step_expected_s=self._pacer.expected_s,
        )

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (mlx_lm's wrapper) while the core serves, else None.

        Other threads may encode with it, one at a time (`corral.engine.thread` renders
        chat templates and tokenizes in a worker thread): this thread only decodes with
        it, and the Rust tokenizer takes any number of readers at once.
        """
        return self._tokenizer

    # -- loading and unloading ------------------------------------------------------

    def load(self) -> ModelInfo:
        """Load the model and its tokenizer (see `load_weights`) and make a
        `BatchGenerator` on a stream of this thread; from then on the core serves.

        Raises:
            Exception: whatever `load_weights` raised.
        """
        loaded = load_weights(self.settings)  # imports mlx_lm first (see there)
        from mlx_lm.generate import BatchGenerator, StopSequences

        model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
        self._model, self._tokenizer = model, tokenizer
        self._vocab_size = int(config.get("vocab_size") or len(tokenizer))
        eos = self._eos = sorted(int(t) for t in tokenizer.eos_token_ids)
        self._default_stops = StopSequences([(t,) for t in eos])
        settings = self.settings
        self._generator = BatchGenerator(
            model, completion_batch_size=settings.completion_batch_size,
            prefill_batch_size=settings.prefill_batch_size,
            prefill_step_size=settings.prefill_step_size, stream=loaded.stream)
        prefix_cache = settings.prefix_cache
        if loaded.group is not None:
            self._lockstep = Lockstep(loaded.group, loaded.stream)
            # Each rank's disk would hold its own shard: one bad file would make the
            # ranks' batches differ, so a gang keeps its prefix cache in memory.
            prefix_cache = msgspec.structs.replace(prefix_cache, disk_dir=None)
        self._prefix = open_prefix_cache(prefix_cache, self.path, model, config)
        self._guidance = Guidance(tokenizer, self._vocab_size, eos,
                                  lambda grammar: self._commands.put(GrammarCompiled(grammar)))
        max_context = config.get("max_position_embeddings")
        _log.debug("engine.loaded", path=self.path, seconds=round(loaded.seconds, 3))
        self.serving = True
        return ModelInfo(
            path=self.path, vocab_size=self._vocab_size, eos_token_ids=eos,
            max_context=int(max_context) if max_context is not None else None,
            load_seconds=loaded.seconds, has_chat_template=bool(tokenizer.has_chat_template),
            tool_calling=tool_calling(tokenizer), structured_output=self._guidance.supported,
            thinking=thinking(tokenizer))

    def teardown(self) -> None:
        """Stop serving and give the model's memory back. Never raises: the thread
        must still report its exit."""
        self.serving = False
        import mlx.core as mx

        try:
            if self._generator is not None:
                self._generator.close()
            self._generator = self._model = self._tokenizer = None
            self._by_uid.clear()
            self._uid_of.clear()
            self._sharing.clear()
            self._compiling.clear()
            if self._guidance is not None:
                self._guidance.close()
            if self._prefix is not None:
                self._prefix.close()
            # Give the model's memory back now, not when another model needs it.
            mx.clear_cache()
        except Exception as exc:
            _log.warning("engine.teardown_failed", path=self.path, error=repr(exc))

    # -- the loop -------------------------------------------------------------------

    def serve(self) -> None:
        """Apply commands and take steps until `Halt` or `closing`.

        In a gang, rank 0 does so and sends the other ranks a tick before each step
        (and `Halt` when it leaves); they apply rank 0's ticks instead of their own
        queue, until its `Halt`. A rank that stops stepping leaves the others blocked
        in a collective: the parent process kills them all (`corral.engine.gang`).

        Raises:
            Exception: what a step raised (or "raise", the injected fault): the engine
                has failed.
        """
        lockstep = self._lockstep
        try:
            while True:
                if lockstep is not None and not lockstep.leads:
                    self._follow(lockstep.receive())
                    continue
                for command in self._drain(block=not self._by_uid):
                    self._apply(command)
                if self._closing.is_set():
                    break
                if self._by_uid:
                    self._step()
                elif lockstep is not None:
                    lockstep.publish(step=False)
        except _Halted:
            pass
        if lockstep is not None and lockstep.leads:
            lockstep.halt()

    def _follow(self, tick: GangTick) -> None:
        """Another rank of a gang: apply rank 0's tick, and step if it does."""
        for op in tick.ops:
            self._apply(op)
        if tick.step != bool(self._by_uid):
            raise RuntimeError(f"the gang diverged: rank 0 steps={tick.step}, this rank "
                               f"has {len(self._by_uid)} sequences")
        if tick.step:
            self._step(tick.chunk)

    def _drain(self, *, block: bool) -> list[Command]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: Command) -> None:
        if isinstance(command, Halt):
            raise _Halted
        lockstep = self._lockstep
        if lockstep is not None and lockstep.leads:
            if isinstance(command, Submit):
                command = lockstep.seeded(command)
            lockstep.record(command)
        if isinstance(command, Submit):
            self._applied += 1
            self._insert(command.seq)
        elif isinstance(command, CancelSequence):
            self._remove(command.seq_id)
        elif isinstance(command, GrammarCompiled):
            for seq in [s for s in self._compiling.values()
                        if s.grammar == command.grammar]:
                del self._compiling[seq.seq_id]
                self._place(seq)
        else:
            self._fault = command.kind

    # -- sequences in and out -------------------------------------------------------

    def _insert(self, seq: EngineSequence) -> None:
        self._remove(seq.seq_id)
        guidance, grammar = self._guidance, seq.grammar
        if guidance is None or grammar is None:
            self._place(seq)
            return
        lockstep = self._lockstep
        if lockstep is not None and not lockstep.leads:
            # Rank 0 says when it starts (`GrammarCompiled`), whether it waited or not.
            self._compiling[seq.seq_id] = seq
        elif not guidance.ready(grammar):
            # Compiled off the step path; the batch steps on meanwhile.
            self._compiling[seq.seq_id] = seq
            guidance.compile(grammar)
        else:
            self._place(seq)
            if lockstep is not None:
                lockstep.record(GrammarCompiled(grammar))

    def _place(self, seq: EngineSequence) -> None:
        tokens = [*seq.prompt, *seq.generated]
        leader = (None if self._prefix is None else self._sharing.leader_for(
            tokens, self._prefix.covered(tokens), self._by_uid.values()))
        if leader is None:
            self._start(seq, tokens)
        else:
            self._sharing.wait(seq, leader)

    def _start(self, seq: EngineSequence, tokens: list[int]) -> None:
        from mlx_lm.generate import StopSequences

        sampling = seq.sampling
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8))
        start = len(seq.generated)
        stop_ids = stop_token_ids(sampling, self._eos)
        stops = (self._default_stops if stop_ids == self._eos
                 else StopSequences([(t,) for t in stop_ids]))
        processors = logits_processors(sampling, start, stop_ids)
        if seq.grammar is not None and self._guidance is not None:
            # Last, so no bias or penalty can give a token the grammar refuses a chance.
            processors.append(self._guidance.processor(seq.grammar, seq.generated))
        hit = self._prefix.lookup(tokens) if self._prefix is not None else None
        cached = hit.tokens if hit is not None else 0
        (uid,) = self._generator.insert(
            [tokens[cached:]],
            max_tokens=[seq.remaining],
            caches=[hit.cache] if hit is not None and hit.cache is not None else None,
            all_tokens=[tokens[:cached]],
            samplers=[sequence_sampler(sampling, seed, start, self._vocab_size)],
            logits_processors=[processors],
            stop_sequences=[stops],
        )
        text = StopText(self._tokenizer.detokenizer, sampling)
        for token in seq.generated:
            text.push(token)
        alternatives = sampling.top_logprobs if sampling.reports_logprobs else None
        self._by_uid[uid] = LiveSequence(seq.seq_id, uid, text, alternatives, tokens, cached,
                                      len(tokens) - cached)
        self._uid_of[seq.seq_id] = uid

    def _remove(self, seq_id: int) -> None:
        if self._compiling.pop(seq_id, None) is not None:
            return
        if self._sharing.forget(seq_id):
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
        for seq in self._sharing.release(uid):
            self._start(seq, [*seq.prompt, *seq.generated])

    def _keep(self, caches: dict[int, tuple[list[Any], list[int]]], *,
              to_disk: bool = False) -> None:
        """Store sequences' KV (from `BatchGenerator.extract_cache` or `remove`)."""
        if self._prefix is not None:
            for cache, tokens in caches.values():
                self._prefix.store(list(tokens), cache, to_disk=to_disk)

    # -- one step -------------------------------------------------------------------

    def _step(self, chunk: int | None = None) -> None:
        """One `BatchGenerator` step; `chunk` is rank 0's prefill chunk on the other
        ranks of a gang (None: this engine chooses it)."""
        if self._fault == "hang":
            self._closing.wait()
            raise _Halted
        if self._fault == "raise":
            self._fault = None
            raise RuntimeError("injected engine fault")
        if self._fault == "stuck":
            self._fault = None
            time.sleep(_STUCK_S)
        self._pace(chunk)
        prompt_responses, generation_responses = self._generator.next()
        self._steps += 1
        prefilled: list[int] = []
        prompt_tokens = 0
        for response in prompt_responses:
            seq = self._by_uid[response.uid]
            done, total = response.progress
            prompt_tokens += seq.to_prefill - (total - done)
            seq.to_prefill = total - done
            if response.end_of_prompt:
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
            out = seq.token_out(response, self._tokenizer)
            outputs.append(out)
            if out.finish_reason is not None:
                if response.finish_reason is None:  # a stop string: still in the batch
                    stopped.append(seq.uid)
                del self._by_uid[seq.uid]
                del self._uid_of[seq.seq_id]
                if response.prompt_cache is not None:
                    self._keep({seq.uid: (response.prompt_cache, response.all_tokens)})
        self._generation_tokens += len(outputs)
        if self._fault == "slow":
            time.sleep(prompt_tokens * _SLOW_S_PER_TOKEN)
        self._pacer.end(prompt_tokens)
        if stopped:
            self._keep(self._generator.remove(stopped, return_prompt_caches=True))
        self._last_step_at = time.monotonic()
        self._post_step(EngineStep(self._steps, outputs, prefilled))

    def _pace(self, chunk: int | None) -> None:
        """Size this step's prefill chunk (unless rank 0 did), tell the gang's other
        ranks if this is its rank 0, and start timing the step.

        BatchGenerator prefills up to `prefill_batch_size` sequences together, oldest
        first, each by one chunk: its `prefill_step_size`, read at every step."""
        prefilling = [s for s in self._by_uid.values() if not s.prefilled]
        prefilling = prefilling[:self.settings.prefill_batch_size]
        if chunk is None:
            chunk = self._pacer.chunk(len(prefilling))
            if self._lockstep is not None:
                self._lockstep.publish(step=True, chunk=chunk)
        self._generator.prefill_step_size = chunk
        tokens = sum(min(s.to_prefill, chunk) for s in prefilling)
        self._pacer.begin(tokens, decodes=len(prefilling) < len(self._by_uid))
