"""The actor kernel: tell/ask, statistics, the monitor, decoding, timeouts, stash, fairness.

Every test runs on trio's MockClock (autojump), so "at once" means "at the same mock
time" and a timeout is checked to the exact mock second, with no real sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import msgspec
import pytest
import trio
import trio.testing

from corral.actors.actor import Actor
from corral.actors.child_spec import Backoff, ChildSpec, Intensity, Restart
from corral.actors.mailbox import Reply
from corral.actors.ref import ActorRef
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem
from corral.protocol.codec import encode
from corral.protocol.errors import (
    ActorExitedError,
    Code,
    EngineClientError,
    OverloadedError,
    TimeoutError,
)
from corral.protocol.lifecycle import Ping, Pong

# -- messages ---------------------------------------------------------------------------


class Items(msgspec.Struct, frozen=True, tag=True):
    values: list[int]


class Add(msgspec.Struct, frozen=True, tag=True):
    n: int


class Get(msgspec.Struct, frozen=True, tag=True):
    reply_type: ClassVar[type] = Items


class Crash(msgspec.Struct, frozen=True, tag=True):
    """Crash after `after` seconds (mock time)."""

    after: float = 0.0
    reply_type: ClassVar[type] = Pong


class Reject(msgspec.Struct, frozen=True, tag=True):
    """Answered with a typed error; the actor must go on."""

    reply_type: ClassVar[type] = Pong


class Ignore(msgspec.Struct, frozen=True, tag=True):
    """Taken but never answered: the asker can only time out."""

    reply_type: ClassVar[type] = Pong


class Hold(msgspec.Struct, frozen=True, tag=True):
    """Answered later, by `Release` (defer_reply)."""

    reply_type: ClassVar[type] = Pong


class Release(msgspec.Struct, frozen=True, tag=True):
    seq: int


class Block(msgspec.Struct, frozen=True, tag=True):
    """Keep the actor busy until the test's gate opens."""


class Unknown(msgspec.Struct, frozen=True, tag=True):
    """A well-formed message of a type no test actor accepts."""

    reply_type: ClassVar[type] = Pong


Message = Ping | Add | Get | Crash | Reject | Ignore | Hold | Release | Block


class Recorder(Actor[Message]):
    """Records what it is told, answers pings, and misbehaves on request."""

    Message = Message
    gate: trio.Event | None = None  # set per test, for Block
    busy: trio.Event | None = None  # set when a Crash or Block starts

    def __init__(self) -> None:
        self.items: list[int] = []
        self.held: list[Reply] = []

    async def handle(self, message: Message) -> Any:
        match message:
            case Ping(seq=seq):
                return Pong(seq)
            case Add(n=n):
                self.items.append(n)
                return None
            case Get():
                return Items(self.items)
            case Crash(after=after):
                if Recorder.busy is not None:
                    Recorder.busy.set()
                await trio.sleep(after)
                raise RuntimeError("crash requested")
            case Reject():
                raise OverloadedError("rejected on purpose", retry_after_ms=7)
            case Ignore():
                self.defer_reply()
                return None
            case Hold():
                reply = self.defer_reply()
                assert reply is not None
                self.held.append(reply)
                return None
            case Release(seq=seq):
                for reply in self.held:
                    reply.send(Pong(seq))
                self.held.clear()
                return None
            case Block():
                if Recorder.busy is not None:
                    Recorder.busy.set()
                assert Recorder.gate is not None
                await Recorder.gate.wait()
                return None


@pytest.fixture(autouse=True)
def _fresh_recorder_events() -> None:
    Recorder.gate = trio.Event()
    Recorder.busy = trio.Event()


@asynccontextmanager
async def serving(system: ActorSystem | None = None, *, backoff: Backoff | None = None,
                  restart: Restart = Restart.PERMANENT) -> AsyncIterator[Supervisor]:
    """A root supervisor with one Recorder child named `r`.

    The block fails with TooSlowError after an hour of mock time, so a regression that
    leaves something waiting fails the test instead of hanging it.
    """
    supervisor = Supervisor(
        [ChildSpec(name="r", factory=Recorder, restart=restart, shutdown=1000)],
        intensity=Intensity(max_restarts=10, period=60.0),
        backoff=backoff or Backoff(min=0.0, max=0.0, random_factor=0.0))
    with trio.fail_after(3600.0):
        async with open_supervisor(supervisor, system=system or ActorSystem()) as sup:
            yield sup


async def still_serves(ref: ActorRef, seq: int = 99) -> None:
    assert await ref.ask(Ping(seq), timeout=5.0) == Pong(seq)


# -- tell / ask ---------------------------------------------------------------------------


async def test_ask_answers_with_the_reply_type(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        answer = await ref.ask(Ping(7), timeout=1.0)
        assert type(answer) is Pong and answer.seq == 7
        assert await ref.ask(Add(1)) is None  # no reply_type: the answer is None
        assert await ref.ask(Get()) == Items([1])


async def test_many_tells_then_one_ask_sees_all_in_order(
        autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        for n in range(500):
            ref.tell_nowait(Add(n))
        for n in range(500, 3000):  # past the mailbox capacity: `tell` waits for room
            await ref.tell(Add(n))
        assert (await ref.ask(Get())).values == list(range(3000))
        assert ref.statistics().messages_in == 3001


async def test_messages_are_copies(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        await ref.tell(Add(1))
        first = await ref.ask(Get())
        await ref.tell(Add(2))
        assert first.values == [1]  # the actor's later state never leaks into an answer


async def test_statistics_fields(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        fresh = ref.statistics()
        assert (fresh.path, fresh.state, fresh.messages_in, fresh.replies_out) == (
            "root/r", "running", 0, 0)
        assert (fresh.restarts, fresh.last_exit_reason, fresh.pending_asks) == (0, None, 0)

        for n in range(3):
            ref.tell_nowait(Add(n))
        # Nothing ran yet: the first went straight to the idle actor, two wait in line.
        assert ref.statistics().queue_depth == 2

        await ref.tell_raw(b"\xc1")  # never valid msgpack
        assert await ref.ask(Get()) == Items([0, 1, 2])
        stats = ref.statistics()
        assert stats.messages_in == 5
        assert stats.replies_out == 1
        assert stats.decode_errors == 1
        assert stats.queue_depth == 0
        assert stats.pending_asks == 0

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.ask, Hold())
            await trio.testing.wait_all_tasks_blocked()
            assert ref.statistics().pending_asks == 1
            await ref.tell(Release(1))
        assert ref.statistics().pending_asks == 0

        with pytest.raises(ActorExitedError):
            await ref.ask(Crash())
        await still_serves(ref)
        stats = ref.statistics()
        assert stats.restarts == 1
        assert stats.last_exit_reason == "RuntimeError: crash requested"
        assert stats.state == "running"


# -- the monitor: an ask to an actor that dies fails at once ------------------------------


async def test_ask_fails_at_the_crash_not_at_the_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        start = trio.current_time()
        with pytest.raises(ActorExitedError) as info:
            await ref.ask(Crash(after=2.0), timeout=30.0)
        assert trio.current_time() - start == pytest.approx(2.0)  # the crash, not 30 s
        assert info.value.path == "root/r"
        assert info.value.reason == "RuntimeError: crash requested"
        assert info.value.code is Code.RUNTIME_ERROR
        await still_serves(ref)


async def test_queued_asks_and_tells_behind_a_crash_fail_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        outcomes: list[tuple[str, float]] = []

        async def ask(message: Any) -> None:
            try:
                await ref.ask(message, timeout=30.0)
            except ActorExitedError as exc:
                outcomes.append((exc.reason, trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, Crash(after=1.0))
            assert Recorder.busy is not None
            await Recorder.busy.wait()  # the crash is in progress; the rest queue behind
            for seq in range(5):
                nursery.start_soon(ask, Ping(seq))
            for n in range(3):
                await ref.tell(Add(n))
        assert len(outcomes) == 6
        assert {reason for reason, _ in outcomes} == {"RuntimeError: crash requested"}
        assert {at for _, at in outcomes} == {1.0}
        assert ref.statistics().dropped == 3  # tells addressed to the dead incarnation
        assert await ref.ask(Get()) == Items([])  # the new incarnation starts clean
        await still_serves(ref)


async def test_wait_exit_reports_each_exit(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        reasons = []

        async def monitor() -> None:
            reasons.append(await ref.wait_exit())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor)
            await trio.testing.wait_all_tasks_blocked()
            await ref.tell(Crash(after=3.0))
        assert [r.describe() for r in reasons] == ["RuntimeError: crash requested"]
        assert trio.current_time() == 3.0
        await still_serves(ref)


# -- messages that do not decode are the sender's error ---------------------------------


async def test_a_struct_of_a_foreign_type_is_invalid_request(
        autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        with pytest.raises(EngineClientError) as info:
            await ref.ask(Unknown(), timeout=5.0)
        assert info.value.code is Code.INVALID_REQUEST
        assert info.value.details["path"] == "root/r"
        assert not info.value.retryable
        await ref.tell(Unknown())  # a tell that does not decode is counted, not fatal
        await still_serves(ref)
        stats = ref.statistics()
        assert stats.decode_errors == 2
        assert stats.restarts == 0


async def test_raw_garbage_is_invalid_request(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        await ref.tell_raw(b"\xc1 not msgpack")
        with pytest.raises(EngineClientError) as info:
            await ref.ask_raw(b"\xc1\xc1", Pong, method="Garbage", timeout=5.0)
        assert info.value.code is Code.INVALID_REQUEST
        # Valid msgpack, wrong schema: a Ping whose seq is a string.
        with pytest.raises(EngineClientError) as info:
            await ref.ask_raw(encode({"type": "Ping", "seq": "x"}), Pong, method="Ping")
        assert info.value.code is Code.INVALID_REQUEST
        await still_serves(ref)
        stats = ref.statistics()
        assert (stats.decode_errors, stats.restarts) == (3, 0)


# -- typed errors, timeouts, deferred replies --------------------------------------------


async def test_ask_timeout_is_a_typed_error(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        start = trio.current_time()
        with pytest.raises(TimeoutError) as info:
            await ref.ask(Ignore(), timeout=2.5, request_id="req-7")
        error = info.value
        assert trio.current_time() - start == 2.5
        assert (error.method, error.timeout, error.request_id) == ("Ignore", 2.5, "req-7")
        assert error.duration == pytest.approx(2.5)
        assert error.code is Code.TIMEOUT and error.retryable
        assert error.details["request_id"] == "req-7"
        assert ref.statistics().pending_asks == 0
        await still_serves(ref)


async def test_default_ask_timeout_comes_from_the_system(
        autojump_clock: trio.testing.MockClock) -> None:
    async with serving(ActorSystem(default_ask_timeout=4.0)) as sup:
        with pytest.raises(TimeoutError) as info:
            await sup.ref("r").ask(Ignore())
        assert info.value.timeout == 4.0
        assert trio.current_time() == 4.0


async def test_ask_timeout_covers_a_full_mailbox(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(ActorSystem(mailbox_capacity=1)) as sup:
        ref = sup.ref("r")
        await ref.tell(Block())
        assert Recorder.busy is not None and Recorder.gate is not None
        await Recorder.busy.wait()
        await ref.tell(Add(1))  # fills the one slot
        with trio.fail_after(60.0), pytest.raises(TimeoutError) as info:
            await ref.ask(Ping(1), timeout=1.5)  # waits for room, then gives up
        assert trio.current_time() == 1.5
        assert info.value.duration == pytest.approx(1.5)
        assert ref.statistics().pending_asks == 0
        with pytest.raises(OverloadedError):
            ref.tell_nowait(Add(2))
        Recorder.gate.set()
        assert await ref.ask(Get()) == Items([1])
        await still_serves(ref)


async def test_corral_error_answers_the_asker_and_the_actor_goes_on(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    system = ActorSystem()
    events = record_events(system)
    async with serving(system) as sup:
        ref = sup.ref("r")
        await ref.tell(Add(1))
        actor = sup.child("r")
        with pytest.raises(OverloadedError) as info:
            await ref.ask(Reject())
        assert info.value.retry_after_ms == 7 and info.value.code is Code.OVERLOADED
        await ref.tell(Reject())  # for a tell, the error is logged and dropped
        await ref.tell(Add(2))
        assert await ref.ask(Get()) == Items([1, 2])  # same state: no restart
        assert sup.child("r") is actor
        assert ref.statistics().restarts == 0
        assert events.of("exited") == []


async def test_defer_reply_answers_later(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as sup:
        ref = sup.ref("r")
        answers: list[Any] = []

        async def hold() -> None:
            answers.append(await ref.ask(Hold(), timeout=10.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []
            await still_serves(ref, 1)  # the actor serves others while replies are held
            await trio.sleep(1.0)
            await ref.tell(Release(5))
        assert answers == [Pong(5), Pong(5)]
        assert trio.current_time() == 1.0


async def test_an_unfinished_ask_fails_when_the_tree_stops(
        autojump_clock: trio.testing.MockClock) -> None:
    failures: list[ActorExitedError] = []

    async def hold(ref: ActorRef) -> None:
        try:
            await ref.ask(Hold(), timeout=100.0)
        except ActorExitedError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        async with serving() as sup:
            nursery.start_soon(hold, sup.ref("r"))
            await trio.testing.wait_all_tasks_blocked()
    assert [f.reason for f in failures] == ["shutdown"]
    assert trio.current_time() == 0.0


# -- the stash: messages wait for the next incarnation -----------------------------------


async def test_messages_sent_while_restarting_reach_the_next_incarnation(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    system = ActorSystem()
    events = record_events(system)
    async with serving(system, backoff=Backoff(min=2.0, max=2.0, random_factor=0.0)) as sup:
        ref = sup.ref("r")
        first = sup.child("r")
        await ref.tell(Crash())
        await events.wait("restarting", "root/r")
        assert ref.statistics().state == "restarting"
        for n in range(3):
            await ref.tell(Add(n))
        assert await ref.ask(Get(), timeout=10.0) == Items([0, 1, 2])
        assert trio.current_time() == 2.0  # answered by the incarnation after the backoff
        assert sup.child("r") is not first
        assert ref.statistics().restarts == 1


async def test_stash_overflow_is_rejected_with_overloaded(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    system = ActorSystem(stash_limit=2)
    events = record_events(system)
    async with serving(system, backoff=Backoff(min=1.0, max=1.0, random_factor=0.0)) as sup:
        ref = sup.ref("r")
        await ref.tell(Crash())
        await events.wait("restarting", "root/r")
        ref.tell_nowait(Add(1))
        await ref.tell(Add(2))
        with pytest.raises(OverloadedError) as info:
            ref.tell_nowait(Add(3))
        assert info.value.details["path"] == "root/r" and info.value.retry_after_ms > 0
        with pytest.raises(OverloadedError):
            await ref.tell(Add(4))
        with pytest.raises(OverloadedError):
            await ref.ask(Ping(1))
        assert trio.current_time() == 0.0  # rejected at once, never parked
        assert ref.statistics().rejected == 3
        await events.wait("restarted", "root/r")
        assert await ref.ask(Get()) == Items([1, 2])  # the stash itself was kept
        await still_serves(ref)


async def test_a_stopped_path_raises_actor_exited(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(restart=Restart.TRANSIENT) as sup:
        ref = sup.ref("r")
        await still_serves(ref)
        await sup.terminate_child("r")
        assert ref.statistics().state == "stopped"
        with pytest.raises(ActorExitedError) as info:
            await ref.ask(Ping(1), timeout=10.0)
        assert (info.value.path, info.value.reason) == ("root/r", "shutdown")
        with pytest.raises(ActorExitedError):
            await ref.tell(Add(1))
        with pytest.raises(ActorExitedError):
            ref.tell_nowait(Add(1))
        with trio.fail_after(60.0):  # a monitor of a dead path fires at once
            assert (await ref.wait_exit()).kind == "shutdown"
        assert trio.current_time() == 0.0
        assert ref.statistics().rejected == 3


# -- fairness ----------------------------------------------------------------------------


class Counter(Actor[Add]):
    """Counts tells without ever waiting, so only the kernel's checkpoints yield."""

    Message = Add
    ticks_seen: ClassVar[list[int]] = []
    ticks = 0
    done = trio.Event()

    async def handle(self, message: Add) -> None:
        Counter.ticks_seen.append(Counter.ticks)
        if message.n == 9_999:
            Counter.done.set()


async def test_a_flooded_actor_does_not_starve_its_neighbours(
        autojump_clock: trio.testing.MockClock) -> None:
    Counter.ticks_seen, Counter.ticks, Counter.done = [], 0, trio.Event()
    system = ActorSystem(mailbox_capacity=16_384, fairness_interval=64)
    supervisor = Supervisor([ChildSpec(name="counter", factory=Counter)])
    async with open_supervisor(supervisor, system=system) as sup:
        ref = sup.ref("counter")
        for n in range(10_000):
            ref.tell_nowait(Add(n))

        async def ticker() -> None:
            while not Counter.done.is_set():
                Counter.ticks += 1
                await trio.lowlevel.checkpoint()

        with trio.fail_after(60.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                await Counter.done.wait()
    seen = Counter.ticks_seen
    assert len(seen) == 10_000
    # The neighbour ran about once per 64 messages while the 10k were drained.
    assert seen[-1] - seen[0] >= 100
    assert max(b - a for a, b in zip(seen, seen[1:], strict=False)) <= 2
    assert trio.current_time() == 0.0

