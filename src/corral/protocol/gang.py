"""One model across several processes (an mlx.distributed gang): its settings, and the
tick its leading rank broadcasts to the others before every step.

A gang's ranks each hold a shard of the model and must take the same steps on the same
batch, or they wait forever inside a collective. So rank 0 alone reads commands; before
each step it sends every rank a `GangTick`: the commands as it applied them (a sequence's
seed filled in, a grammar's readiness made explicit) and the prefill chunk it chose.
The other ranks apply exactly that, and step. Data only: no I/O, no behaviour.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from corral.protocol.serving_messages import CancelSequence, InjectFault, Submit
from corral.protocol.validation import FieldError

__all__ = [
    "LOOPBACK",
    "DistributedSettings",
    "GangOp",
    "GangTick",
    "GrammarCompiled",
    "Halt",
]

LOOPBACK = "127.0.0.1"


class DistributedSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True,
                          kw_only=True):
    """Serve one model from `ranks` worker processes, each holding a shard of it
    (tensor parallel, with mlx_lm's `shard` for the architecture), supervised as one
    gang: a rank that dies or stalls takes every rank down at once, and the gang
    restarts like one worker. The key `generation.models[].distributed`.

    Attributes:
        ranks: how many processes share the model; its attention heads and key-value
            heads must divide evenly among them.
        backend: the mlx.distributed backend. "ring" runs over TCP, on one machine or
            several (Ethernet or Thunderbolt IP).
        hosts: the address of each rank, rank 0 first; rank 0 is where corral runs.
            Empty: every rank on 127.0.0.1. A rank on another host is started there
            with ``ssh HOST``, with the same Python path as here.
        port: the ring's first port; rank r listens on `port + r`. 0: free ports are
            picked at each start, which works on one host only.
    """

    ranks: Annotated[int, msgspec.Meta(ge=2, le=64)]
    backend: Literal["ring"] = "ring"
    hosts: tuple[Annotated[str, msgspec.Meta(min_length=1)], ...] = ()
    port: Annotated[int, msgspec.Meta(ge=0, le=65535 - 64)] = 0

    def __post_init__(self) -> None:
        if self.hosts and len(self.hosts) != self.ranks:
            raise FieldError("hosts", f"expected one host per rank ({self.ranks}), "
                                      f"got {len(self.hosts)}")
        if self.port == 0 and any(host != LOOPBACK for host in self.hosts):
            raise FieldError("port", "expected a fixed port when a rank runs on another "
                                     "host (each rank listens on port + rank)")

    @property
    def rank_hosts(self) -> tuple[str, ...]:
        """The host of each rank, rank 0 first."""
        return self.hosts or (LOOPBACK,) * self.ranks


class GrammarCompiled(msgspec.Struct, frozen=True, tag=True):
    """`grammar` is compiled: the sequences waiting for it start now, in the order they
    were submitted. On rank 0 the guidance thread sends it; the other ranks start their
    waiting sequences when rank 0 did, compiling the grammar then if they must."""

    grammar: str


class Halt(msgspec.Struct, frozen=True, tag=True):
    """Leave the serving loop after the commands before this one."""


GangOp = Submit | CancelSequence | InjectFault | GrammarCompiled | Halt
"""A command as rank 0 applied it, for the other ranks to apply the same way."""


class GangTick(msgspec.Struct, frozen=True):
    """What every rank does before its next step.

    Attributes:
        ops: the commands to apply first, in order.
        step: whether to take a step after them (every rank has the same batch).
        chunk: the prompt tokens of one sequence the step may prefill.
    """

    ops: list[GangOp] = []
    step: bool = False
    chunk: int = 0
