"""The messages the serving actors exchange: the model actor's and the stream
registry's; frozen msgspec Structs, no behaviour.

Messages an actor accepts are tagged Structs gathered in a Union that the actor names as
its `Message`; a message that expects an answer names its reply type in the class
variable `reply_type`, so `ask` decodes the reply with the right schema.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

from corral.protocol.lifecycle import ExitReason
from corral.protocol.messages import (
    EngineSequence,
    FinishReason,
    ModelInfo,
    SamplingParams,
    TokenOut,
)

# -- model actor messages --------------------------------------------------------------


class Accepted(msgspec.Struct, frozen=True, tag=True):
    seq_id: int


class Submit(msgspec.Struct, frozen=True, tag=True):
    """Start (or resume) a sequence; answered once the engine has it queued. Also the
    frame that hands a sequence, already validated, to a worker process (no answer)."""

    seq: EngineSequence
    reply_type: ClassVar[type[Accepted]] = Accepted


class CancelSequence(msgspec.Struct, frozen=True, tag=True):
    """Remove a sequence from the batch before the next step. Unknown ids are ignored."""

    seq_id: int


class EngineFailed(msgspec.Struct, frozen=True, tag=True):
    """The engine thread or worker died; the model actor crashes so its supervisor acts."""

    error: str


class EngineLoaded(msgspec.Struct, frozen=True, tag=True):
    info: ModelInfo


class Ready(msgspec.Struct, frozen=True, tag=True):
    alias: str
    info: ModelInfo


class WaitReady(msgspec.Struct, frozen=True, tag=True):
    """Answered with `Ready` once the model is loaded, or the load's typed error."""

    reply_type: ClassVar[type[Ready]] = Ready


class TokenIds(msgspec.Struct, frozen=True, tag=True):
    ids: list[int]


class Text(msgspec.Struct, frozen=True, tag=True):
    text: str


class Tokenize(msgspec.Struct, frozen=True, tag=True):
    text: str
    add_special_tokens: bool = True
    reply_type: ClassVar[type[TokenIds]] = TokenIds


class Detokenize(msgspec.Struct, frozen=True, tag=True):
    ids: list[int]
    reply_type: ClassVar[type[Text]] = Text


class ApplyChatTemplate(msgspec.Struct, frozen=True, tag=True):
    """Render chat turns (and the tools, when given) with the model's chat template.
    Turns and tools are the template's free-form mappings (`runtime/tools.py` makes
    them from `ChatMessage` and `Tool`); `kwargs`, the request's `chat_template_kwargs`,
    go to the template's rendering as its variables."""

    turns: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = {}
    reply_type: ClassVar[type[TokenIds]] = TokenIds


class Sequences(msgspec.Struct, frozen=True, tag=True):
    seq_ids: list[int]


class ListSequences(msgspec.Struct, frozen=True, tag=True):
    """Which sequences the engine runs now (reconciliation after a registry restart)."""

    reply_type: ClassVar[type[Sequences]] = Sequences


FaultKind = Literal["raise", "hang", "stuck", "slow", "exit", "segfault"]
"""Test hooks: the engine's next step raises or hangs (until it is closed); "stuck" makes
it block for 2 s whatever happens, as a step in a call that does not return; "slow" makes
every later step take 10 ms more per prompt token it prefills, as a slow machine would;
in process isolation the whole worker also ends, with `os._exit(3)` ("exit") or a real
SIGSEGV ("segfault")."""


class InjectFault(msgspec.Struct, frozen=True, tag=True):
    """Test hook: break the engine (see `FaultKind`). A model actor's message, and the
    frame that carries it on to a worker process."""

    kind: FaultKind


# -- stream registry messages ------------------------------------------------------------


class Admitted(msgspec.Struct, frozen=True, tag=True):
    stream_id: int
    deadline: float


class Admit(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Ask for a stream slot; waits in the queue when all slots run, or Overloaded.

    On admission the registry opens the stream's buffer (with the sequence to submit)
    in the stream table, in the same step, so no stream is ever admitted untracked.
    `stream_id` comes from the table (the caller's, so it can close what it asked for).
    `client` names who asked (a connection, an address), for fair admission: a freed
    slot goes to the waiting client with the fewest streams running, and a full queue
    makes room by refusing the newest waiter of the client that holds the most. None
    is one anonymous client. `priority` comes first: a lower value is admitted before
    any higher one, and the fairness above holds among waiters of one priority.
    `sampling` and `grammar` go on into the `EngineSequence`
    as they are (`sampling.max_tokens` set); `generated`: ids a lost run already sent
    (see `GenerateParams`), which count toward it.
    """

    stream_id: int
    model: str
    timeout_s: float
    prompt: list[int]
    sampling: SamplingParams
    grammar: str | None = None
    request_id: str | None = None
    client: str | None = None
    generated: list[int] = []
    priority: int = 0
    reply_type: ClassVar[type[Admitted]] = Admitted


class ModelOutput(msgspec.Struct, frozen=True, tag=True):
    """One engine step's tokens of one model, forwarded by its model actor."""

    model: str
    step: int
    outputs: list[TokenOut]


class CloseStream(msgspec.Struct, frozen=True, tag=True):
    """The client is done with a stream (read to the end, cancelled, or gone)."""

    stream_id: int
    reason: FinishReason


class ModelDown(msgspec.Struct, frozen=True, tag=True):
    """A model actor exited; its streams cannot continue on that incarnation.
    `unloaded`: the model was unloaded, so they cannot continue at all."""

    model: str
    reason: ExitReason
    unloaded: bool = False


class Reconcile(msgspec.Struct, frozen=True, tag=True):
    """A model's running sequences, as it answered a restarted registry."""

    model: str
    running: list[int]


class DeadlinesDue(msgspec.Struct, frozen=True, tag=True):
    now: float


class RegistryState(msgspec.Struct, frozen=True, tag=True):
    active: int
    queued: int
    streams: dict[int, str]


class GetRegistryState(msgspec.Struct, frozen=True, tag=True):
    reply_type: ClassVar[type[RegistryState]] = RegistryState
