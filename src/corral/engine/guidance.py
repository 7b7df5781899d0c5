"""Constrained decoding inside the batch: llguidance matchers as logits processors.

`Guidance` belongs to one model load. It builds llguidance's view of the model's
tokenizer once, at load, and compiles each grammar once, in a thread of its own, so
that a new grammar never stalls the batch's steps; compiled matchers are kept per
grammar string (LRU) and copied for each sequence. `processor` gives a sequence its
`GrammarMask`, the last of its logits processors in
`BatchGenerator.insert(logits_processors=...)`: a constrained sequence stays in the
batch with the others, and their logits are never touched.

The mask is applied with plain ops (the bitmask unpacked by numpy, then `mx.where`), so
it runs unchanged on CPU, Metal and CUDA; llguidance's own MLX helper is a Metal
kernel. Engine thread only, except the compiling, which runs in the guidance thread and
reports through `on_compiled`. It must never touch trio.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from copy import copy
from typing import TYPE_CHECKING, Any

import structlog

from corral.engine.grammar import GRAMMAR_CACHE_SIZE
from corral.protocol.messages import Thinking, ToolCalling

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

__all__ = ["GrammarMask", "Guidance", "thinking", "tool_calling"]

_log = structlog.get_logger("corral.engine")

class GrammarMask:
    """One sequence's logits processor: only tokens its grammar allows keep their logits.

    mlx_lm calls it once per step with the sequence's tokens so far, the last of them
    the token the step feeds in: the last prompt token on the first call, then each
    token sampled. So from the second call on, that last token is the one sampled under
    the previous mask, and the matcher consumes it before computing the next mask. Once
    the grammar is complete only EOS is allowed, so the sequence ends where the grammar
    accepts. A matcher that fails (llguidance reports, never raises) allows EOS only.
    """

    def __init__(self, matcher: LLMatcher) -> None:
        self._matcher = matcher
        self._started = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np

        matcher = self._matcher
        if self._started and not matcher.consume_token(int(tokens[-1].item())):
            _log.warning("guidance.token_refused", error=matcher.get_error())
        self._started = True
        # One bit per token, least significant first within each 32-bit word. Unpacked
        # on the host (microseconds), so the graph gains a single `where`.
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8),
                             bitorder="little").view(np.bool_)
        width = logits.shape[-1]
        if bits.size < width:  # model rows past the tokenizer's vocabulary
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=np.bool_)])
        return mx.where(mx.array(bits[:width]), logits, mx.array(-mx.inf, logits.dtype))


class Guidance:
    """Grammars for one loaded model.

    Args:
        tokenizer: mlx_lm's tokenizer wrapper of the model; only a fast (Rust-backed)
            tokenizer can drive llguidance (`supported` says whether this one can).
        vocab_size: the model's vocabulary, the width of its logits.
        eos_token_ids: the tokens that end a sequence, allowed where a grammar accepts.
        on_compiled: called in the guidance thread with each grammar `compile` finished
            (compiled, or failed and logged); it must not block.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int],
                 on_compiled: Callable[[str], None]) -> None:
        self._on_compiled = on_compiled
        self._lock = threading.Lock()  # guards _compiled and _pending
        self._compiled: collections.OrderedDict[str, LLMatcher] = collections.OrderedDict()
        self._pending: set[str] = set()  # handed to the guidance thread, not done yet
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="corral-guidance")
        self._tokenizer = _llg_tokenizer(tokenizer, vocab_size, eos_token_ids)

    @property
    def supported(self) -> bool:
        """Whether this model's tokenizer can drive grammars at all (a sequence with a
        grammar must not be inserted otherwise)."""
        return self._tokenizer is not None

    def ready(self, grammar: str) -> bool:
        """Whether `grammar` is compiled (a sequence using it can start now)."""
        with self._lock:
            return grammar in self._compiled

    def compile(self, grammar: str) -> None:
        """Compile `grammar` in the guidance thread, then call `on_compiled(grammar)`;
        a grammar already on its way is compiled (and reported) once."""
        with self._lock:
            if grammar in self._pending:
                return
            self._pending.add(grammar)
        self._executor.submit(self._compile_and_report, grammar)

    def processor(self, grammar: str, generated: list[int]) -> GrammarMask:
        """A fresh mask for one sequence, its matcher advanced past `generated` (the
        tokens a resumed sequence already delivered). Compiles here, in the calling
        thread, only if the grammar left the cache since `ready` said it was in."""
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
        if template is None:
            template = self._compile(grammar)
        matcher = template.deep_copy()
        if generated and not matcher.consume_tokens(list(generated)):
            _log.warning("guidance.resume_refused", error=matcher.get_error())
        return GrammarMask(matcher)

    def close(self) -> None:
        """Stop taking work; a compile under way finishes in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _compile_and_report(self, grammar: str) -> None:
        try:
            self._compile(grammar)
        finally:
            with self._lock:
                self._pending.discard(grammar)
            self._on_compiled(grammar)

    def _compile(self, grammar: str) -> LLMatcher:
        from llguidance import LLMatcher

        assert self._tokenizer is not None, "a grammar on a model that cannot take one"
        # Never raises: a grammar llguidance refuses gives a matcher in its error
        # state, which allows EOS only (the runtime checked the grammar before).
        matcher = LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            _log.warning("guidance.compile_failed", error=matcher.get_error())
        with self._lock:
            self._compiled[grammar] = matcher
            self._compiled.move_to_end(grammar)
            while len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher


def _llg_tokenizer(tokenizer: Any, vocab_size: int,
                   eos_token_ids: list[int]) -> LLTokenizer | None:
    """llguidance's tokenizer for a model, as `llguidance.hf.from_tokenizer` builds it
    (mlx_lm's wrapper is not the transformers class it checks for), or None when the
    tokenizer is not a fast one or llguidance refuses it (logged)."""
    from llguidance import LLTokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        _log.info("guidance.off", reason="the tokenizer is not a fast tokenizer")
        return None
    backend = copy(backend)
    backend.no_padding()
    backend.no_truncation()
    try:
        return LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos_token_ids)
    except Exception as exc:
        _log.info("guidance.off", reason=repr(exc))
        return None


def thinking(tokenizer: Any) -> Thinking | None:
    """How the model marks its reasoning, from mlx_lm's tokenizer wrapper (its think
    markers are in the vocabulary), or None."""
    if not tokenizer.has_thinking:
        return None
    return Thinking(str(tokenizer.think_start), str(tokenizer.think_end),
                    [int(i) for i in tokenizer.think_start_tokens],
                    [int(i) for i in tokenizer.think_end_tokens])


def tool_calling(tokenizer: Any) -> ToolCalling | None:
    """How the model writes tool calls, from mlx_lm's tokenizer wrapper: the parser its
    loader inferred from the chat template, and whether the markers are single tokens
    (llguidance sees added tokens as special: a grammar names them `<tool_call>`)."""
    if not tokenizer.has_tool_calling:
        return None
    start, end = tokenizer.tool_call_start_tokens, tokenizer.tool_call_end_tokens
    return ToolCalling(str(tokenizer.init_kwargs.get("tool_parser_type")),
                       marker_tokens=bool(start and end and len(start) == len(end) == 1))
