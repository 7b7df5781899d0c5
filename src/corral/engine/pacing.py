"""How much work one engine step takes on, and how long it may run: the pacing of steps.

A long prompt is prefilled in chunks, one chunk per step, so that the progress watchdog
sees a step at least once per chunk, and sequences that are decoding meanwhile wait one
chunk, not one prompt. `StepPacer` sizes the chunk from the measured speed of this
model on this machine (about `target_s` of work a step, never more than the configured
`prefill_step_size` tokens a sequence), and says how long the step now running is
expected to take, from the same measurements. The owner's watchdog calls a step stalled
only when it overruns that expectation by `OVERRUN_FACTOR` and its own floor.

The rule, with p the measured seconds per prompt token and d the measured seconds of a
decoding step (exponential moving averages over the steps seen so far):
    expected(step) = prompt_tokens(step) * p + (d if the step decodes)
Before the first measurement, the chunk is `FIRST_CHUNK` tokens and nothing is
expected (the floor alone applies).

Engine thread only, except `expected_s`, a float that other threads may read.
"""

from __future__ import annotations

import time
from typing import Final, final

__all__ = ["FIRST_CHUNK", "MIN_CHUNK", "OVERRUN_FACTOR", "StepPacer"]

FIRST_CHUNK: Final = 32
"""Prompt tokens per sequence in steps before the speed is known: small enough that even
the reference BLAS on a slow CPU prefills it in seconds."""

MIN_CHUNK: Final = 16
"""The fewest prompt tokens per sequence a step takes: below this, a step's fixed cost
dominates and a long prompt gains nothing from being cut finer."""

OVERRUN_FACTOR: Final = 4.0
"""How many times its expected time a step may run before it can be called stalled."""

_SMOOTHING: Final = 0.3  # weight of the newest measurement in the moving averages


@final
class StepPacer:
    """Measures the steps of one engine and sizes the next one.

    Args:
        target_s: seconds of work a step should take on while prompts are prefilled.
        max_chunk: the most prompt tokens of one sequence in one step.
    """

    def __init__(self, target_s: float, max_chunk: int) -> None:
        self._target_s = target_s
        self._max_chunk = max_chunk
        self._prompt_s: float | None = None  # seconds per prompt token
        self._decode_s: float | None = None  # seconds per decoding step
        self._started_at = 0.0
        self._decodes = False
        self.expected_s = 0.0
        """Seconds the step now running is expected to take; 0 between steps and while
        nothing is measured yet. Written by the engine thread, read from any."""

    def chunk(self, prefilling: int) -> int:
        """Prompt tokens per sequence for the next step, `prefilling` sequences being
        prefilled together in it."""
        if self._prompt_s is None:
            return min(FIRST_CHUNK, self._max_chunk)
        budget = self._target_s - (self._decode_s or 0.0)
        tokens = int(max(budget, 0.0) / self._prompt_s) // max(prefilling, 1)
        return max(min(MIN_CHUNK, self._max_chunk), min(tokens, self._max_chunk))

    def begin(self, prompt_tokens: int, decodes: bool) -> None:
        """A step starts, taking `prompt_tokens` prompt tokens (an upper bound is fine)
        and decoding when `decodes`."""
        self._decodes = decodes
        expected = 0.0
        if prompt_tokens and self._prompt_s is not None:
            expected += prompt_tokens * self._prompt_s
        if decodes and self._decode_s is not None:
            expected += self._decode_s
        self.expected_s = expected
        self._started_at = time.monotonic()

    def end(self, prompt_tokens: int) -> None:
        """The step that `begin` started ended, having prefilled `prompt_tokens`."""
        seconds = time.monotonic() - self._started_at
        self.expected_s = 0.0
        if prompt_tokens:
            decode = (self._decode_s or 0.0) if self._decodes else 0.0
            per_token = max(seconds - decode, seconds / 2) / prompt_tokens
            self._prompt_s = _smooth(self._prompt_s, per_token)
        elif self._decodes:
            self._decode_s = _smooth(self._decode_s, seconds)


def _smooth(average: float | None, sample: float) -> float:
    return sample if average is None else average + _SMOOTHING * (sample - average)
