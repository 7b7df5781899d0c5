"""Compiling grammars: whether llguidance accepts a grammar, decided once per grammar
string.

`check_grammar` compiles a grammar without a tokenizer and names what is wrong as
GuidanceError; its verdicts are kept per grammar string in a bounded LRU. The runtime
calls it in a worker thread before admission, never on an engine's step path. No MLX
here; llguidance is imported on first use.
"""

from __future__ import annotations

import functools
from typing import Final

from corral.protocol.grammar import guidance_error

__all__ = ["GRAMMAR_CACHE_SIZE", "check_grammar", "compile_problem"]

GRAMMAR_CACHE_SIZE: Final = 256
"""Grammar strings whose verdict `check_grammar` remembers (and, engine side, compiled
matchers per model)."""


def check_grammar(grammar: str, field: str = "response_format") -> None:
    """Refuse a grammar llguidance cannot compile. Compiles on the first call for a
    grammar string (up to a second for extreme grammars; call it off the event loop),
    then answers from the cache.

    Raises:
        EngineClientError: GuidanceError naming the problem, as llguidance states it,
            and `field`, the request field the grammar came from.
    """
    problem = compile_problem(grammar)
    if problem:
        raise guidance_error(f"{field}: the grammar cannot be compiled: {problem}", field)


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def compile_problem(grammar: str) -> str:
    """What llguidance finds wrong with a grammar, or "" when it compiles; remembered
    for the last `GRAMMAR_CACHE_SIZE` grammar strings (`compile_problem.cache_info()`)."""
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(grammar).strip()
