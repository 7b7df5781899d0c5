"""One rank's side of a gang's lockstep: rank 0 broadcasts a `GangTick` before every
step, the other ranks receive it (see `corral.protocol.gang`).

The tick crosses in one `mx.distributed.all_sum` of a fixed-size byte buffer (rank 0's
bytes, zeros from the others), and in a second one only when it does not fit. Engine
thread only. A rank that is gone or stopped leaves the others blocked inside the
collective: the parent process notices (a closed pipe, a missed heartbeat, an overrun
step) and kills the whole gang, so nothing here times out.
"""

from __future__ import annotations

import os
from typing import Any, Final, final

import msgspec

from corral.protocol.gang import GangOp, GangTick, Halt
from corral.protocol.serving_messages import Submit

__all__ = ["Lockstep"]

_INLINE: Final = 1024  # bytes: a tick without a long prompt crosses in one collective
_LENGTH: Final = 4  # the tick's length, little-endian, leads the buffer


@final
class Lockstep:
    """The tick exchange of one rank in `group` (an ``mx.distributed.Group``).

    Rank 0 `record`s each command as it applies it and `publish`es the tick before its
    step; the other ranks `receive` it. The exchange runs on `stream`, the model's: a
    step's own collectives may still run there (mlx_lm evaluates a step ahead), and the
    ring matches collectives by their order, so the tick must queue behind them.
    """

    def __init__(self, group: Any, stream: Any) -> None:
        self._group = group
        self._stream = stream
        self.leads: Final = group.rank() == 0
        self._log: list[GangOp] = []
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(GangTick).decode
        self._halted = False

    def seeded(self, submit: Submit) -> Submit:
        """`submit` with a sampling seed: every rank must sample the same tokens, so a
        sequence without a seed gets one here, on rank 0, for all of them."""
        sampling = submit.seq.sampling
        if sampling.seed is not None:
            return submit
        seed = int.from_bytes(os.urandom(8)) >> 1  # within `SamplingParams.seed`
        seq = msgspec.structs.replace(
            submit.seq, sampling=msgspec.structs.replace(sampling, seed=seed))
        return Submit(seq)

    def record(self, op: GangOp) -> None:
        """Rank 0: `op` was applied; the other ranks apply it before the next step."""
        self._log.append(op)

    def publish(self, *, step: bool, chunk: int = 0) -> None:
        """Rank 0: send what was recorded since the last tick, and whether (and with
        which prefill chunk) to step. Blocks until every rank has it."""
        tick = GangTick(self._log, step, chunk)
        self._log = []
        self._exchange(self._encode(tick))

    def halt(self) -> None:
        """Rank 0: tell the other ranks to leave their loop, unless told already; what
        was recorded goes first."""
        if not self._halted:
            self._halted = True
            self.record(Halt())
            self.publish(step=False)

    def receive(self) -> GangTick:
        """Another rank: wait for rank 0's next tick."""
        return self._decode(self._exchange(b""))

    def _exchange(self, payload: bytes) -> bytes:
        """All-sum a byte buffer: rank 0 gives `payload`, every rank gets it."""
        import mlx.core as mx
        import numpy as np

        head = bytearray(_INLINE)
        if self.leads:
            head[:_LENGTH] = len(payload).to_bytes(_LENGTH, "little")
            inline = payload[:_INLINE - _LENGTH]
            head[_LENGTH:_LENGTH + len(inline)] = inline
        summed = self._all_sum(mx, np, bytes(head))
        length = int.from_bytes(summed[:_LENGTH], "little")
        data = summed[_LENGTH:_LENGTH + length]
        rest = length - len(data)
        if rest > 0:
            data += self._all_sum(mx, np, payload[len(data):] if self.leads else bytes(rest))
        return data

    def _all_sum(self, mx: Any, np: Any, buffer: bytes) -> bytes:
        array = mx.array(np.frombuffer(buffer, dtype=np.uint8))
        summed = mx.distributed.all_sum(array, group=self._group, stream=self._stream)
        return bytes(np.array(summed, copy=False))
