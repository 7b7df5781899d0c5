"""Incremental detokenizing with stop strings: the text one sequence hands out.

Engine thread only (the detokenizer is the model's, used between steps). It must never
emit text past a stop string, nor hold back anything a later token cannot change.
"""

from __future__ import annotations

from typing import Any

from corral.protocol.sampling import SamplingParams

__all__ = ["StopText"]


class StopText:
    """One sequence's text, released token by token, never past a stop string.

    `emitted` counts the characters of the detokenizer's text already handed out. A
    suffix of the text that could begin a stop string is held back until the next
    token decides it. What is held back is a function of the tokens alone, so feeding a
    resumed sequence's generated tokens through `push` reproduces exactly the state of
    the uninterrupted run. Stop strings are looked for once more than `min_tokens`
    tokens were pushed (as vLLM does); the text of the first ones is released whole.

    Args:
        detokenizer: a fresh streaming detokenizer of the model's tokenizer.
        sampling: the sequence's; its stop strings (empty ones are ignored) and
            `min_tokens`.
    """

    def __init__(self, detokenizer: Any, sampling: SamplingParams) -> None:
        self._detokenizer = detokenizer
        self._all_stops = [s for s in sampling.stop_strings if s]
        self._stops: list[str] = []
        self._min_tokens = sampling.min_tokens
        self._pushed = 0
        self._emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; return the newly releasable text and whether a stop matched."""
        self._detokenizer.add_token(token)
        self._pushed += 1
        if self._pushed > self._min_tokens:
            self._stops = self._all_stops
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
