"""The prefix cache of one model: KV caches of token prefixes seen before, for reuse.

A new sequence asks `lookup` for the longest stored prefix of its tokens and gets a
copy-on-write view of that KV, trimmed to the shared part, which it hands to
`BatchGenerator.insert(caches=...)`; it then prefills only the rest. The engine `store`s
a sequence's KV when its prompt is processed (so sequences running at the same time
share it) and when it finishes (prompt plus generated tokens, so a conversation's next
turn hits). Memory is bounded in bytes and evicts the least recently used prefix; a
prefix that cannot fit is skipped, never an error. With a disk tier, long prefixes are
also written to disk and read back after a crash or a restart.

mlx_lm's `LRUPromptCache` is not used, for three reasons: a lookup does not refresh an
entry's recency (a system prompt every request hits is evicted first), an exact hit
returns an empty remainder that `BatchGenerator.insert` refuses, and there is no place
for a disk tier. Its building blocks are: `trim_prompt_cache`, `can_trim_prompt_cache`,
`save_prompt_cache` and `load_prompt_cache`.

Engine thread only. Nothing here fails a request: the worst case is a miss.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import structlog

from corral.config import PrefixCacheConfig
from corral.engine.prefix_disk import DiskPrefixStore, model_identity
from corral.engine.prefix_index import BLOCK, PrefixIndex
from corral.protocol.messages import PrefixCacheStatistics

__all__ = ["Hit", "PrefixCache", "default_prefix_cache_bytes", "open_prefix_cache", "reusable"]

_log = structlog.get_logger("corral.engine")


def reusable(cache: list[Any]) -> bool:
    """A model's cache can be reused from a prefix: every layer trims and merges."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    return bool(cache) and can_trim_prompt_cache(cache) and all(
        hasattr(c, "merge") for c in cache)


def default_prefix_cache_bytes() -> int:
    """One eighth of physical memory: the in-memory prefix cache bound when unset.

    Unified memory (Apple silicon) holds the weights and the running batch's KV in the
    same pool, so the cache takes a modest share; 0 where the size cannot be read.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    return max(0, total // 8)


def open_prefix_cache(settings: PrefixCacheConfig, path: str, model: Any,
                      config: dict[str, Any]) -> PrefixCache | None:
    """The prefix cache `settings` ask for, for the model loaded from `path` (with its
    `config`), or None when it is off or the model's KV cache cannot be reused. A disk
    tier that cannot be opened, for whatever reason, is left out with one warning: the
    model serves without it."""
    from mlx_lm.models.cache import make_prompt_cache

    if not settings.enabled:
        return None
    if not reusable(make_prompt_cache(model)):
        _log.info("prefix_cache.off", path=path,
                  reason="this model's KV cache cannot be trimmed and merged")
        return None
    disk = None
    if settings.disk_dir is not None:
        try:
            disk = DiskPrefixStore(
                settings.disk_dir, model_identity(path, config, model),
                max_bytes=settings.disk_max_bytes, min_tokens=settings.disk_min_tokens)
        except Exception as exc:  # a cache problem never fails the model
            _log.warning("prefix_cache.disk_off", path=path, disk_dir=settings.disk_dir,
                         error=repr(exc))
    max_bytes = (settings.max_bytes if settings.max_bytes is not None
                 else default_prefix_cache_bytes())
    return PrefixCache(max_bytes=max_bytes, disk=disk)


@dataclass(frozen=True)
class Hit:
    """What a lookup found: `tokens` leading tokens whose KV is in `cache` (None on a
    miss, with `tokens` 0)."""

    cache: list[Any] | None
    tokens: int


_MISS = Hit(None, 0)


@dataclass
class _Entry:
    tokens: list[int]
    cache: list[Any]
    nbytes: int


class PrefixCache:
    """Prefixes in memory (LRU, bounded in bytes) and optionally on disk.

    Args:
        max_bytes: bound on the KV held in memory.
        disk: the disk tier, or None.
    """

    def __init__(self, *, max_bytes: int, disk: DiskPrefixStore | None = None) -> None:
        self._max_bytes = max_bytes
        self._disk = disk
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recent first
        self._index: PrefixIndex[int] = PrefixIndex()
        self._next_key = 0
        self._bytes = 0
        self._queries = 0
        self._hits = 0
        self._evictions = 0
        self._disk_hit_tokens = 0

    def covered(self, tokens: list[int]) -> int:
        """How many leading tokens a lookup would reuse now, without copying anything."""
        _, length = self._index.longest(tokens)
        if self._disk is not None:
            length = max(length, self._disk.longest(tokens)[1])
        return min(length, len(tokens) - 1)

    def lookup(self, tokens: list[int]) -> Hit:
        """The longest stored prefix of `tokens`, leaving at least one token to prefill.

        The cache returned is the caller's: the stored arrays are shared, and
        `BatchGenerator` copies them when it merges the cache into a batch, so the stored
        prefix is never written to.
        """
        self._queries += len(tokens)
        key, length = self._index.longest(tokens)
        entry = self._entries[key] if key is not None else None
        from_disk = False
        if self._disk is not None:
            name, on_disk = self._disk.longest(tokens)
            loaded = self._disk.load(name) if name is not None and on_disk > length else None
            if loaded is not None:
                stored = self._insert(*loaded)
                entry = self._entries[stored] if stored is not None else _Entry(*loaded, 0)
                key, length, from_disk = stored, on_disk, True
        length = min(length, len(tokens) - 1)
        if entry is None or length < BLOCK:
            return _MISS
        if key is not None:
            self._entries.move_to_end(key)
        self._hits += length
        if from_disk:
            self._disk_hit_tokens += length
        return Hit(_view(entry, length), length)

    def store(self, tokens: list[int], cache: list[Any], *, to_disk: bool) -> None:
        """Keep the KV of `tokens` (`cache` holds exactly them; it becomes the store's),
        and with `to_disk` write it to the disk tier too.

        Stored prefixes that `tokens` extends are dropped, since this one serves them
        too; if a stored prefix already holds all of `tokens`, only its recency changes.
        """
        import mlx.core as mx

        if len(tokens) < BLOCK:
            return
        key, length = self._index.longest(tokens)
        held = key is not None and length == len(tokens)
        if key is not None and held:
            self._entries.move_to_end(key)
        disk = self._disk if to_disk and self._disk is not None else None
        if disk is not None and disk.covers(tokens):
            disk = None
        if held and disk is None:
            return
        mx.eval([c.state for c in cache])
        if not held:
            self._insert(tokens, cache)
        if disk is not None:
            disk.store(tokens, cache)

    def statistics(self) -> PrefixCacheStatistics:
        disk = self._disk
        return PrefixCacheStatistics(
            enabled=True, queries=self._queries, hits=self._hits, bytes=self._bytes,
            entries=len(self._entries), evictions=self._evictions,
            disk_bytes=disk.bytes if disk is not None else 0,
            disk_entries=len(disk) if disk is not None else 0,
            disk_writes=disk.writes if disk is not None else 0,
            disk_loads=disk.loads if disk is not None else 0,
            disk_hit_tokens=self._disk_hit_tokens,
            disk_errors=disk.errors if disk is not None else 0)

    def close(self) -> None:
        """Drop the memory tier and let the disk tier finish its queued writes."""
        self._entries.clear()
        self._index = PrefixIndex()
        self._bytes = 0
        if self._disk is not None:
            self._disk.close()

    def _insert(self, tokens: list[int], cache: list[Any]) -> int | None:
        """Add an entry, evicting the least recently used until it fits; None when it
        is larger than the whole bound (then nothing is evicted for it)."""
        nbytes = sum(c.nbytes for c in cache)
        if nbytes > self._max_bytes:
            return None
        for covered in self._index.prefixes_of(tokens):
            self._drop(covered)
        while self._entries and self._bytes + nbytes > self._max_bytes:
            self._drop(next(iter(self._entries)))
            self._evictions += 1
        key = self._next_key
        self._next_key += 1
        self._entries[key] = _Entry(tokens, cache, nbytes)
        self._index.add(key, tokens)
        self._bytes += nbytes
        return key

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._index.remove(key)
        self._bytes -= entry.nbytes


def _view(entry: _Entry, length: int) -> list[Any]:
    """The first `length` tokens of an entry's KV, sharing its arrays."""
    from mlx_lm.models.cache import trim_prompt_cache

    view = [copy.copy(c) for c in entry.cache]
    trim_prompt_cache(view, len(entry.tokens) - length)
    return view
