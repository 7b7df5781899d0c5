"""Which new sequences wait for a sequence still prefilling, so as to start from its KV
instead of computing the same prefix a second time.

`EngineCore` asks `leader_for` before it starts a sequence, parks it with `wait`, and
starts what `release` hands back once the leader's prompt is in the prefix cache (or the
leader left). Engine thread only; it knows nothing of MLX or of `BatchGenerator`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol, final

from corral.engine.prefix_index import BLOCK, common_prefix_length
from corral.protocol.messages import EngineSequence

__all__ = ["SHARE_AT_LEAST", "PrefillSharing", "Prefilling"]

SHARE_AT_LEAST: Final = 2 * BLOCK
"""A sequence waits for one ahead of it only when that one will compute at least this
many of its leading tokens that no cache holds yet."""


class Prefilling(Protocol):
    """What sharing needs to know of a sequence in the batch."""

    @property
    def uid(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def prefilled(self) -> bool: ...


@final
class PrefillSharing:
    """The sequences waiting for another's prefill, by the uid they wait on."""

    def __init__(self) -> None:
        self._waiting_on: dict[int, list[EngineSequence]] = {}
        self._leader_of: dict[int, int] = {}  # seq_id -> the uid it waits on

    def __len__(self) -> int:
        return len(self._leader_of)

    @staticmethod
    def leader_for(tokens: list[int], covered: int,
                   running: Iterable[Prefilling]) -> int | None:
        """The uid of a sequence still prefilling whose KV would save one with `tokens`
        at least `SHARE_AT_LEAST` tokens of prefill over the `covered` ones the cache
        holds now, or None.

        Waiting for it costs no more than prefilling those tokens again would, as long
        as they are at least half of what that sequence prefills: a short shared start
        is not worth waiting behind a long prompt for. A twin (the same tokens, as the
        `n` choices of one request have) waits whenever the prompt can be cached at all,
        so that it is prefilled once."""
        best, best_shared = None, covered + SHARE_AT_LEAST - 1
        for seq in running:
            if not seq.prefilled:
                shared = min(common_prefix_length(seq.tokens, tokens), len(tokens) - 1)
                if seq.tokens == tokens and shared >= BLOCK and shared > covered:
                    return seq.uid
                if shared > best_shared and 2 * shared >= len(seq.tokens) - seq.cached_tokens:
                    best, best_shared = seq.uid, shared
        return best

    def wait(self, seq: EngineSequence, leader: int) -> None:
        """Park `seq` until `release(leader)`."""
        self._waiting_on.setdefault(leader, []).append(seq)
        self._leader_of[seq.seq_id] = leader

    def release(self, leader: int) -> list[EngineSequence]:
        """The sequences that waited for `leader`, in the order they came; they wait no
        more."""
        released = self._waiting_on.pop(leader, [])
        for seq in released:
            del self._leader_of[seq.seq_id]
        return released

    def forget(self, seq_id: int) -> bool:
        """Stop waiting for sequence `seq_id`; False if it was not waiting."""
        leader = self._leader_of.pop(seq_id, None)
        if leader is None:
            return False
        self._waiting_on[leader] = [s for s in self._waiting_on[leader] if s.seq_id != seq_id]
        return True

    def clear(self) -> None:
        self._waiting_on.clear()
        self._leader_of.clear()
