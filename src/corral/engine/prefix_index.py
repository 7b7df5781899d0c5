"""Finding, among stored token sequences, the one that shares the longest prefix with a query.

Sequences are cut into blocks of `BLOCK` tokens and each block is named by a hash chained
over the blocks before it, as vLLM's automatic prefix caching names its KV blocks. A
lookup walks the query's chain as far as it is known, then compares tokens only against
the few sequences that reach that deep, so its cost grows with the query's length, not
with the number of sequences stored. Hashes only choose candidates: every answer is
checked token by token, so a collision can cost a hit, never give a wrong one.

It holds token ids and keys only, never KV arrays, and does no I/O.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Final, Generic, TypeVar

__all__ = ["BLOCK", "PrefixIndex", "common_prefix_length"]

BLOCK: Final = 32
"""Tokens per hashed block; a prefix shorter than one block is never reported."""

_ROOT: Final = 0

K = TypeVar("K", bound=Hashable)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share (slice comparisons run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def _chain(tokens: Sequence[int]) -> list[int]:
    """The hash naming each full block of `tokens`, chained over the blocks before it."""
    hashes = []
    previous = _ROOT
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        previous = hash((previous, *tokens[start:start + BLOCK]))
        hashes.append(previous)
    return hashes


class PrefixIndex(Generic[K]):
    """Token sequences under keys, searchable by longest shared prefix."""

    def __init__(self) -> None:
        self._tokens: dict[K, list[int]] = {}
        # Chain hash of a block -> keys whose sequence holds that block (and all before).
        self._through: dict[int, dict[K, None]] = {}
        # Chain hash of the last full block (or _ROOT) -> keys whose sequence ends within
        # the block after it: the candidates for "is a prefix of" at that depth.
        self._ending: dict[int, dict[K, None]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, key: object) -> bool:
        return key in self._tokens

    def tokens(self, key: K) -> list[int]:
        return self._tokens[key]

    def add(self, key: K, tokens: list[int]) -> None:
        """Index `tokens` under `key` (replacing what `key` held)."""
        self.remove(key)
        self._tokens[key] = tokens
        chain = _chain(tokens)
        for block in chain:
            self._through.setdefault(block, {})[key] = None
        self._ending.setdefault(chain[-1] if chain else _ROOT, {})[key] = None

    def remove(self, key: K) -> None:
        tokens = self._tokens.pop(key, None)
        if tokens is None:
            return
        chain = _chain(tokens)
        for block in chain:
            _discard(self._through, block, key)
        _discard(self._ending, chain[-1] if chain else _ROOT, key)

    def longest(self, query: Sequence[int]) -> tuple[K | None, int]:
        """The key sharing the longest prefix with `query`, and that length.

        Ties go to the shortest stored sequence (the least to trim). Shared prefixes
        shorter than one block are not looked for: `(None, 0)`.
        """
        chain = _chain(query)
        depth = 0
        while depth < len(chain) and chain[depth] in self._through:
            depth += 1
        if depth == 0:
            return None, 0
        start = depth * BLOCK  # candidates agree before here (checked below)
        best: K | None = None
        best_length = 0
        for key in self._through[chain[depth - 1]]:
            tokens = self._tokens[key]
            length = start + common_prefix_length(tokens[start:], query[start:])
            if length > best_length or (
                length == best_length and best is not None
                and len(tokens) < len(self._tokens[best])
            ):
                best, best_length = key, length
        if best is None or self._tokens[best][:start] != list(query[:start]):
            return None, 0  # a hash collision: no hit rather than a wrong one
        return best, best_length

    def prefixes_of(self, query: Sequence[int]) -> list[K]:
        """Keys whose whole sequence is a prefix of `query` (`query` itself included)."""
        found = []
        for block in [_ROOT, *_chain(query)]:
            for key in self._ending.get(block, ()):
                tokens = self._tokens[key]
                if len(tokens) <= len(query) and list(query[:len(tokens)]) == tokens:
                    found.append(key)
        return found


def _discard(table: dict[int, dict[K, None]], block: int, key: K) -> None:
    keys = table.get(block)
    if keys is not None:
        keys.pop(key, None)
        if not keys:
            del table[block]
