"""The breaker actor: one `CircuitBreaker` behind a mailbox, shared by every task that
holds its ref, and the function API (`call_through`) that goes through it by messages.

Its handlers never await; the state machine itself lives in `corral.resilience.breaker`
and knows nothing of actors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar, TypeVarTuple, final

import msgspec
import structlog
import trio

from corral.actors.actor import Actor
from corral.actors.ref import ActorRef
from corral.config import CircuitBreakerConfig
from corral.protocol.errors import ActorExitedError, OverloadedError
from corral.resilience.breaker import CircuitBreaker
from corral.resilience.breaker_types import (
    BreakerStatistics,
    Outcome,
    Permit,
    StateChangeHook,
)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_log = structlog.get_logger("corral.breaker")


class PermitGranted(msgspec.Struct, frozen=True):
    permit: Permit


class Acquire(msgspec.Struct, frozen=True, tag="breaker.acquire"):
    """Ask for a permit: answered `PermitGranted`, or CircuitBreakerOpenError."""

    reply_type: ClassVar[type[PermitGranted]] = PermitGranted


class Record(msgspec.Struct, frozen=True, tag="breaker.record"):
    """Give a permit back with its outcome (a tell; no answer)."""

    permit: Permit
    outcome: Outcome
    duration_s: float | None = None


class GetState(msgspec.Struct, frozen=True, tag="breaker.get_state"):
    """Answered with the breaker's `BreakerStatistics`."""

    reply_type: ClassVar[type[BreakerStatistics]] = BreakerStatistics


class ForceOpen(msgspec.Struct, frozen=True, tag="breaker.force_open"):
    """Operator: `CircuitBreaker.force_open`; answered with the statistics after it."""

    reply_type: ClassVar[type[BreakerStatistics]] = BreakerStatistics


class Disable(msgspec.Struct, frozen=True, tag="breaker.disable"):
    """Operator: `CircuitBreaker.disable`; answered with the statistics after it."""

    reply_type: ClassVar[type[BreakerStatistics]] = BreakerStatistics


class Reset(msgspec.Struct, frozen=True, tag="breaker.reset"):
    """Operator: `CircuitBreaker.reset`; answered with the statistics after it."""

    reply_type: ClassVar[type[BreakerStatistics]] = BreakerStatistics


BreakerMessage = Acquire | Record | GetState | ForceOpen | Disable | Reset


@final
class BreakerActor(Actor[BreakerMessage]):
    """One CircuitBreaker behind a mailbox, shared by every task that holds the ref.

    The breaker lives and dies with the incarnation: a restart builds a fresh CLOSED
    breaker, and permits of the old one count as late. Its handlers never await, and
    only a raising `on_state_change` hook can crash them. In a model's rest_for_one
    group (breaker, retry, model actor) the breaker comes first, so it is restarted
    only when it crashes itself, which is rare; a crash of the model actor after it
    leaves the breaker and its counts alone, which is what lets the breaker see the
    model's failures at all.

    Args:
        name: the circuit's name.
        config: the breaker's settings.
        on_state_change: passed to the CircuitBreaker (metrics hook it here).
    """

    Message = BreakerMessage

    def __init__(self, name: str, config: CircuitBreakerConfig = CircuitBreakerConfig(), *,
                 on_state_change: StateChangeHook | None = None) -> None:
        self.breaker = CircuitBreaker(name, config, on_state_change=on_state_change)

    async def handle(self, message: BreakerMessage) -> Any:
        breaker = self.breaker
        match message:
            case Acquire():
                return PermitGranted(breaker.acquire())
            case Record(permit=permit, outcome=outcome, duration_s=duration):
                breaker.record(permit, outcome, duration)
                return None
            case GetState():
                pass
            case ForceOpen():
                breaker.force_open()
            case Disable():
                breaker.disable()
            case Reset():
                breaker.reset()
        return breaker.statistics()


async def acquire_through(ref: ActorRef, *, timeout: float | None = None) -> Permit:
    """A permit from the breaker actor at `ref`, for a caller that records the outcome
    itself (`Record`). The wait is shielded (bounded by `timeout`), so a permit is never
    granted to a caller that cancellation then stops from recording it: the caller
    must follow with `checkpoint_if_cancelled` inside the block that records.

    Raises:
        CircuitBreakerOpenError: the breaker refused.
        ActorExitedError, OverloadedError, TimeoutError: the breaker actor did not answer.
    """
    with trio.CancelScope(shield=True):
        granted: PermitGranted = await ref.ask(Acquire(), timeout=timeout)
    return granted.permit


async def call_through(ref: ActorRef, fn: Callable[[*Ts], Awaitable[T]],
                       *args: *Ts, timeout: float | None = None) -> T:
    """`await fn(*args)` through the breaker actor at `ref`: the function API by messages.

    Acquires a permit, runs `fn`, and tells the outcome (by `CircuitBreaker.outcome_of`,
    with the duration on trio's clock). A permit is never lost to cancellation: the
    wait for the permit is shielded (bounded by `timeout`) and a permit granted to a
    caller cancelled meanwhile goes straight back as ignored, as does the permit of a
    call cancelled while it runs.

    Args:
        timeout: seconds to wait for the permit; defaults to the system's ask timeout.

    Raises:
        CircuitBreakerOpenError: the breaker refused; `fn` was not called.
        ActorExitedError, OverloadedError, TimeoutError: the breaker actor did not
            answer; `fn` was not called.
    """
    permit = await acquire_through(ref, timeout=timeout)
    started = trio.current_time()
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
        result = await fn(*args)
    except BaseException as exc:
        await _report(ref, permit, CircuitBreaker.outcome_of(exc), trio.current_time() - started)
        raise
    await _report(ref, permit, Outcome.SUCCESS, trio.current_time() - started)
    return result


async def _report(ref: ActorRef, permit: Permit, outcome: Outcome, duration: float) -> None:
    # Shielded without a deadline: tell waits only while the mailbox is full, and the
    # breaker actor drains it without ever awaiting, so this cannot hang; an unshielded
    # tell would lose a cancelled probe's permit and could wedge HALF_OPEN.
    with trio.CancelScope(shield=True):
        try:
            await ref.tell(Record(permit, outcome, duration))
        except (ActorExitedError, OverloadedError) as exc:
            # The breaker is gone or restarting with a full stash; its successor has
            # never seen this permit, so there is nothing to give back.
            _log.warning("breaker.record_lost", circuit=permit.circuit,
                         outcome=outcome.value, error=repr(exc))

